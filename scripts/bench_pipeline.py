"""Text-to-image speed and peak memory: ldm.Pipeline vs diffusers' StableDiffusionPipeline, same weights.

    PYTHONPATH=. python scripts/bench_pipeline.py --quick                 # default model 64x64 + SD 1.5 256x256
    PYTHONPATH=. python scripts/bench_pipeline.py --model sd15 --steps 10 --repeats 3 --batch 1 4 --threads 1
    PYTHONPATH=. python scripts/bench_pipeline.py --model sd15 --steps 1 --repeats 0 --batch 1 --threads 1 \
        --keep /tmp/bench_sd15 --settings diffusers ldm-lean ldm-plain         # peak memory only

Both pipelines use DPM-Solver++ 2M (ldm: sampler="dpmpp_2m"; diffusers: DPMSolverMultistepScheduler), the same
steps, guidance 7.5, size and batch. Each (library, setting) runs in its own subprocess: peak memory is
the peak RSS (VmHWM) of that process (weights loading included, for both libraries alike); on CUDA it is
torch.cuda.max_memory_allocated. Times are per image, the median over ``--repeats`` runs after one warm-up.
ldm is measured with batch_invariant True (its CPU default: the U-Net runs one batch row at a time) and False,
lean (``from_pretrained``'s default: one packed copy of each U-Net and VAE conv weight) or not (``lean=False``:
the packed copy beside the plain weight), and with prepacking off. ``--repeats 0`` runs one generation and
reports only the peak memory; "load MB" is the peak once the pipeline is loaded, before generating.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    size, batch = a.size, a.batch[0]
    prompts = [bc.PROMPT] * batch
    _, load = bc.load_pipeline(a.lib, a.folder, device="cuda" if cuda else "cpu",
                               batch_invariant=bool(a.batch_invariant), lean=bool(a.lean), prepack=bool(a.prepack))

    def generate():
        return load(prompts, a.steps, size)

    load_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else bc.peak_rss_mb()
    generate()                                     # warm-up: allocator, kernel selection, prepacking
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
    print(json.dumps({"s_per_image": bc.median(times) if times else None, "times": times, "peak_mb": peak,
                      "load_peak_mb": load_peak}))


# name -> (label, child args) of every measurable setting
SETTINGS = {
    "diffusers": ("diffusers", ["--lib", "diffusers"]),
    "ldm-lean": ("ldm (batch_invariant=True, lean)", ["--lib", "ldm", "--batch-invariant", "1", "--lean", "1"]),
    "ldm-lean-batched": ("ldm (batch_invariant=False, lean)",
                         ["--lib", "ldm", "--batch-invariant", "0", "--lean", "1"]),
    "ldm-plain": ("ldm (batch_invariant=True, not lean)", ["--lib", "ldm", "--batch-invariant", "1", "--lean", "0"]),
    "ldm-batched": ("ldm (batch_invariant=False, not lean)",
                    ["--lib", "ldm", "--batch-invariant", "0", "--lean", "0"]),
    "ldm-noprepack": ("ldm (batch_invariant=False, prepack=False)",
                      ["--lib", "ldm", "--batch-invariant", "0", "--prepack", "0", "--lean", "0"]),
}
DEFAULT_SETTINGS = ["diffusers", "ldm-lean", "ldm-lean-batched", "ldm-batched", "ldm-noprepack"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["default", "sd15"], choices=["default", "sd15"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=None, help="sd15 image size (default 256 on CPU, 512 on CUDA)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="steps 4, repeats 1 (a rough first look)")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    p.add_argument("--keep", type=Path, default=None,
                   help="build the weights folders under this directory once and reuse them on later runs")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
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

    sd_size = a.size or (512 if torch.cuda.is_available() else 256)
    print(f"# torch {torch.__version__}, threads {a.threads}, steps {a.steps}, repeats {a.repeats}, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}")
    print("| model | size | batch | setting | s/image | images/s | ldm/diffusers images/s | peak MB | load MB "
          "| load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.model:
            folder = bc.make_folder(model, (a.keep or Path(tmp)) / model, reuse=a.keep is not None)
            size = 64 if model == "default" else sd_size
            for batch in a.batch:
                base = None
                for label, extra in (SETTINGS[name] for name in a.settings):
                    common = ["--folder", str(folder), "--steps", str(a.steps), "--repeats", str(a.repeats),
                              "--size", str(size), "--batch", str(batch), "--threads", str(a.threads)]
                    r = bc.run_child(Path(__file__), extra + common)
                    timing = "| - | - | - "
                    if r["s_per_image"] is not None:
                        ips = 1 / r["s_per_image"]
                        base = ips if base is None else base
                        timing = f"| {r['s_per_image']:.3f} | {ips:.2f} | {ips / base:.2f} "
                    print(f"| {model} | {size} | {batch} | {label} {timing}| {r['peak_mb']:.0f} | "
                          f"{r['load_peak_mb']:.0f} | {bc.load_average()} |", flush=True)


if __name__ == "__main__":
    main()
