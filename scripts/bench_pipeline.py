"""Text-to-image speed and peak memory: ldm.Pipeline vs diffusers' StableDiffusion(XL)Pipeline, same weights.

    PYTHONPATH=. python scripts/bench_pipeline.py --quick                 # default model 64x64 + SD 1.5 256x256
    PYTHONPATH=. python scripts/bench_pipeline.py --model sd15 --steps 10 --repeats 3 --batch 1 4 --threads 1
    PYTHONPATH=. python scripts/bench_pipeline.py --model sd15 --steps 1 --repeats 0 --batch 1 --threads 1 \
        --keep /tmp/bench_sd15 --settings diffusers ldm-lean ldm-plain         # peak memory only
    PYTHONPATH=. python scripts/bench_pipeline.py --model sd15 --steps 4 --batch 1 --rounds 3 --keep /tmp/bench_keep \
        --settings diffusers ldm-lean ldm-bf16 ldm-bf16-vae openvino-dynamic openvino-static   # the CPU peers
    PYTHONPATH=. python scripts/bench_pipeline.py --model sdxl --steps 2 --repeats 1 --batch 1 --keep /tmp/bench \
        --settings diffusers ldm-lean                        # full-size SDXL base, random weights: 512² on CPU

Both pipelines use DPM-Solver++ 2M (ldm: sampler="dpmpp_2m"; diffusers: DPMSolverMultistepScheduler), the same
steps, guidance 7.5, size and batch. Each (library, setting) runs in its own subprocess: peak memory is
the peak RSS (VmHWM) of that process (weights loading included, for both libraries alike); on CUDA it is
torch.cuda.max_memory_allocated. Times are per image, the median over ``--repeats`` runs after one warm-up.
ldm is measured with batch_invariant True (its CPU default: the U-Net runs one batch row at a time) and False,
lean (``from_pretrained``'s default: one packed copy of each U-Net and VAE conv weight) or not (``lean=False``:
the packed copy beside the plain weight), and with prepacking off. ``--repeats 0`` runs one generation and
reports only the peak memory; "load MB" is the peak once the pipeline is loaded, before generating; "first
call s" is the warm-up call's time per batch (for ``ldm-compile``, the compiling).
``--rounds N`` runs the whole list of settings N times, alternating them, and reports the median of the rounds
(on a shared machine a slow minute then spreads over all settings instead of spoiling one).

OpenVINO (optimum-intel's OVStableDiffusionPipeline, bf16 by INFERENCE_PRECISION_HINT, static shapes by
``reshape`` or dynamic) runs from its own venv, set up once (optimum-intel pins older transformers/diffusers):

    python -m venv --system-site-packages .venv-openvino && \
        .venv-openvino/bin/pip install "optimum-intel[openvino]==2.2.0" diffusers

(``--system-site-packages`` reuses the installed CPU torch that optimum's export traces with; the venv's own
transformers/diffusers shadow the newer ones.) It is looked for in the repository, then beside it
(``--openvino-python`` points elsewhere); its settings are skipped, with a note, when it is absent. The weights
folder is exported to OpenVINO IR once, beside it (scripts/bench_openvino.py).

"mean |Δ| /255" compares each ldm setting's first image with ldm fp32's (same seed, same noise): what bf16
costs in pixels. ``--check-invariance`` adds one more check to each ldm child: image 2 of four different prompts
bitwise equal to the same prompt and seed generated alone ("alone = in batch").
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    size, batch = a.size, a.batch[0]
    prompts = [bc.PROMPT] * batch
    pipe, load = bc.load_pipeline(a.lib, a.folder, device="cuda" if cuda else "cpu",
                               batch_invariant=bool(a.batch_invariant), lean=bool(a.lean), prepack=bool(a.prepack),
                               dtype=a.dtype, vae_dtype=a.vae_dtype, micro_batch=a.micro_batch,
                               compile=bool(a.compile), backend=a.backend)

    def generate():
        return load(prompts, a.steps, size)

    load_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else bc.peak_rss_mb()
    t0 = time.perf_counter()
    generate()                                     # warm-up: allocator, kernel selection, prepacking, compiling
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / batch)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else bc.peak_rss_mb()
    if a.save_image:
        np.save(a.save_image, generate()[0])
    invariant = None
    if a.invariance and a.lib == "ldm":
        # image 2 of four different prompts (seeds 0..3) against the same prompt and seed alone: bitwise?
        prompts4 = [f"{bc.PROMPT}, variant {i}" for i in range(4)]
        run = dict(steps=a.steps, guidance=7.5, sampler="dpmpp_2m", height=size, width=size, progress=False,
                   output_type="np")
        invariant = bool(np.array_equal(pipe(prompts4, seed=[0, 1, 2, 3], **run)[2],
                                        pipe(prompts4[2], seed=2, **run)[0]))
    print(json.dumps({"s_per_image": bc.median(times) if times else None, "times": times, "peak_mb": peak,
                      "load_peak_mb": load_peak, "first_s": first, "invariant": invariant}))


# name -> (label, child args) of every measurable setting; "openvino-*" run scripts/bench_openvino.py
SETTINGS = {
    "diffusers": ("diffusers", ["--lib", "diffusers"]),
    "ldm-lean": ("ldm defaults (fp32, batch_invariant, lean; backend auto)",
                 ["--lib", "ldm", "--batch-invariant", "1", "--lean", "1"]),
    "ldm-auto": ("ldm dtype='auto' (backend auto)", ["--lib", "ldm", "--dtype", "auto"]),
    "ldm-torch": ("ldm fp32, backend='torch' (PyTorch eager)", ["--lib", "ldm", "--backend", "torch"]),
    "ldm-torch-bf16-vae": ("ldm bf16 + VAE bf16, backend='torch'",
                           ["--lib", "ldm", "--backend", "torch", "--dtype", "bfloat16", "--vae-dtype", "bfloat16"]),
    "ldm-ov-bf16-vae": ("ldm bf16 + VAE bf16, backend='openvino'",
                        ["--lib", "ldm", "--backend", "openvino", "--dtype", "bfloat16", "--vae-dtype", "bfloat16"]),
    "ldm-mb1": ("ldm (fp32, batch_invariant, micro_batch=1)", ["--lib", "ldm", "--micro-batch", "1"]),
    "ldm-mb4": ("ldm (fp32, batch_invariant, micro_batch=4)", ["--lib", "ldm", "--micro-batch", "4"]),
    "ldm-lean-batched": ("ldm (fp32, batch_invariant=False, lean)",
                         ["--lib", "ldm", "--batch-invariant", "0", "--lean", "1"]),
    "ldm-plain": ("ldm (batch_invariant=True, not lean)", ["--lib", "ldm", "--batch-invariant", "1", "--lean", "0"]),
    "ldm-batched": ("ldm (batch_invariant=False, not lean)",
                    ["--lib", "ldm", "--batch-invariant", "0", "--lean", "0"]),
    "ldm-noprepack": ("ldm (batch_invariant=False, prepack=False)",
                      ["--lib", "ldm", "--batch-invariant", "0", "--prepack", "0", "--lean", "0"]),
    "ldm-compile": ("ldm compile=True (fp32, torch.compile'd U-Net)", ["--lib", "ldm", "--compile", "1"]),
    "ldm-bf16": ("ldm dtype=bfloat16 (VAE fp32)", ["--lib", "ldm", "--dtype", "bfloat16"]),
    "ldm-bf16-vae": ("ldm dtype=bfloat16, vae_dtype=bfloat16",
                     ["--lib", "ldm", "--dtype", "bfloat16", "--vae-dtype", "bfloat16"]),
    "openvino-dynamic": ("OpenVINO bf16, dynamic shapes", ["--shapes", "dynamic", "--precision", "bf16"]),
    "openvino-static": ("OpenVINO bf16, static shapes (reshape)", ["--shapes", "static", "--precision", "bf16"]),
    "openvino-static-f32": ("OpenVINO f32, static shapes", ["--shapes", "static", "--precision", "f32"]),
}
DEFAULT_SETTINGS = ["diffusers", "ldm-lean", "ldm-lean-batched", "ldm-batched", "ldm-noprepack"]
OPENVINO_SCRIPT = Path(__file__).resolve().parent / "bench_openvino.py"


def openvino_python() -> Path:
    """The OpenVINO venv's interpreter: in the repository, else beside it."""
    found = [root / ".venv-openvino" / "bin" / "python" for root in (bc.ROOT, bc.ROOT.parent)]
    return next((p for p in found if p.is_file()), found[0])


def measure(name: str, folder: Path, common: list[str], openvino_python: Path) -> dict | None:
    """One child run of setting ``name``; None (with a note) for OpenVINO when its venv is absent."""
    extra = SETTINGS[name][1]
    if not name.startswith("openvino"):
        return bc.run_child(Path(__file__), extra + ["--folder", str(folder)] + common)
    if not openvino_python.is_file():
        print(f"# {name} skipped: no OpenVINO venv at {openvino_python} (see this script's --help)", flush=True)
        return None
    ir = folder.with_name(folder.name + "-openvino")
    if not (ir / "model_index.json").is_file():
        subprocess.run([str(openvino_python), str(OPENVINO_SCRIPT), "--export", str(folder), str(ir)], check=True,
                       capture_output=True)
    return bc.run_child(OPENVINO_SCRIPT, extra + ["--ir", str(ir)] + common, python=openvino_python)


def combine(runs: list[dict]) -> dict:
    """The median over rounds of each child's figures (peak memory: the largest)."""
    timed = [r["s_per_image"] for r in runs if r["s_per_image"] is not None]
    return {"s_per_image": bc.median(timed) if timed else None, "peak_mb": max(r["peak_mb"] for r in runs),
            "load_peak_mb": max(r["load_peak_mb"] for r in runs), "first_s": runs[0].get("first_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["default", "sd15"], choices=["default", "sd15", "sdxl"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=None, help="sd15/sdxl image size (default: sd15 256 on CPU, "
                   "512 on CUDA; sdxl 512 on CPU, 1024 on CUDA)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="steps 4, repeats 1 (a rough first look)")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    p.add_argument("--keep", type=Path, default=None,
                   help="build the weights folders under this directory once and reuse them on later runs")
    p.add_argument("--rounds", type=int, default=1, help="run all settings this many times, alternating them")
    p.add_argument("--openvino-python", type=Path, default=None, help="default: .venv-openvino/bin/python in "
                   "the repository or beside it")
    p.add_argument("--check-invariance", action="store_true", help="ldm: image alone bitwise = in a batch of 4?")
    p.add_argument("--save-image", default=None, help=argparse.SUPPRESS)
    p.add_argument("--invariance", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--vae-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--compile", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--lib", default="ldm", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--batch-invariant", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--prepack", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--lean", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if a.quick:
        a.steps, a.repeats = 4, 1
    import torch

    cuda = torch.cuda.is_available()
    sizes = {"default": 64, "sd15": a.size or (512 if cuda else 256), "sdxl": a.size or (1024 if cuda else 512)}
    print(f"# {bc.cpu_name()}; torch {torch.__version__}, threads {a.threads}, steps {a.steps}, repeats "
          f"{a.repeats}, rounds {a.rounds}, {'CUDA' if torch.cuda.is_available() else 'CPU'}")
    python = a.openvino_python or openvino_python()
    print(f"# load average before: {bc.load_average()}")
    print("| model | size | batch | setting | s/image | images/s | vs diffusers images/s | first call s | peak MB "
          "| load MB | mean abs diff /255 vs ldm fp32 | alone = in batch | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.model:
            folder = bc.make_folder(model, (a.keep or Path(tmp)) / model, reuse=a.keep is not None)
            size = sizes[model]
            for batch in a.batch:
                common = ["--steps", str(a.steps), "--repeats", str(a.repeats), "--size", str(size), "--batch",
                          str(batch), "--threads", str(a.threads)]
                runs: dict[str, list[dict]] = {name: [] for name in a.settings}
                images = {name: Path(tmp) / f"{model}-{batch}-{name}.npy" for name in a.settings}
                for round_ in range(a.rounds):
                    for name in a.settings:
                        extra = ["--save-image", str(images[name])] if round_ == 0 else []
                        if round_ == 0 and a.check_invariance and name.startswith("ldm"):
                            extra.append("--invariance")
                        r = measure(name, folder, common + extra, python)
                        if r is not None:
                            runs[name].append(r)
                reference = images.get("ldm-lean")
                base = None
                for name, done in runs.items():
                    if not done:
                        continue
                    r, timing = combine(done), "| - | - | - "
                    if r["s_per_image"] is not None:
                        ips = 1 / r["s_per_image"]
                        base = ips if base is None else base
                        timing = f"| {r['s_per_image']:.3f} | {ips:.2f} | {ips / base:.2f} "
                    diff = "-"
                    if name.startswith("ldm") and reference is not None and reference.is_file() \
                            and images[name].is_file():
                        diff = f"{np.abs(np.load(images[name]) - np.load(reference)).mean() * 255:.2f}"
                    invariant = {None: "-", True: "yes", False: "**no**"}[done[0].get("invariant")]
                    first = "-" if r["first_s"] is None else f"{r['first_s']:.2f}"
                    print(f"| {model} | {size} | {batch} | {SETTINGS[name][0]} {timing}| {first} | "
                          f"{r['peak_mb']:.0f} | {r['load_peak_mb']:.0f} | {diff} | {invariant} | "
                          f"{bc.load_average()} |", flush=True)
    print(f"# load average after: {bc.load_average()}")

if __name__ == "__main__":
    main()
