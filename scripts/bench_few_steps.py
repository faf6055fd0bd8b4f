"""Few-step text-to-image on the CPU: LCM 4 steps, guidance 1, SD VAE vs TAESD, ldm vs diffusers, same weights.

    PYTHONPATH=. python scripts/bench_few_steps.py --keep /tmp/bench_few --threads 2        # the docs row: SD 1.5, 512²
    PYTHONPATH=. python scripts/bench_few_steps.py --settings ldm-taesd diffusers-taesd --repeats 5
    PYTHONPATH=. python scripts/bench_few_steps.py --model tiny --size 64 --repeats 1    # smoke test: seconds

The issue 35 "Speed" row of docs/benchmarks.md: SD 1.5's architecture with random weights (scripts/bench_common.py,
``make_folder("sd15")``; ``--keep`` builds it once and reuses it), 512x512, LCM sampler at 4 steps, guidance 1
(no classifier-free batch: one U-Net call a step), batch 1, decoded by the model's SD VAE or by TAESD (a
random-weight diffusers ``AutoencoderTiny`` -- TAESD's architecture -- saved beside the model as ``<model>-taesd/``).

- diffusers: ``StableDiffusionPipeline`` from the folder in float32 with ``LCMScheduler.from_config`` of the
  folder's scheduler, ``guidance_scale=1.0``; TAESD by ``pipe.vae = AutoencoderTiny.from_pretrained(taesd)``.
- ldm: ``Pipeline.from_pretrained(folder)`` (its defaults: the backend "auto" is OpenVINO on a CPU where it is
  installed) or ``(folder, dtype="auto")``; TAESD by ``pipe.load_vae(taesd)``; ``sampler="lcm", guidance=1.0``.

Both start from the same initial latents (seeded ``torch.randn``, passed as ``latents``). Each setting runs in
its own subprocess: one warm-up call ("first call s": OpenVINO's compiling shows here), then ``--repeats`` timed
calls; s/image is their median. Peak RSS is the child's VmHWM (loading included, both libraries alike); "load
MB" is the peak once the pipeline is loaded, before the first image.
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

# name -> (label, library, ldm dtype, TAESD?)
SETTINGS = {
    "diffusers-sdvae": ("diffusers, SD VAE", "diffusers", None, False),
    "diffusers-taesd": ("diffusers, TAESD", "diffusers", None, True),
    "ldm-sdvae": ("ldm defaults, SD VAE", "ldm", None, False),
    "ldm-taesd": ("ldm defaults, TAESD", "ldm", None, True),
    "ldm-auto-taesd": ("ldm dtype='auto', TAESD", "ldm", "auto", True),
}
CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def make_taesd(folder: Path, seed: int = 0) -> Path:
    """TAESD's architecture (diffusers' AutoencoderTiny defaults: madebyollin/taesd's config) with random weights,
    saved as a folder; reused when already there."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny().save_pretrained(folder, safe_serialization=True)
    return folder


def child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    label, lib, dtype, tiny = SETTINGS[a.setting]
    vae = json.loads((Path(a.folder) / "vae" / "config.json").read_text())
    side = a.size // 2 ** (len(vae["block_out_channels"]) - 1)
    latents = torch.randn(1, vae["latent_channels"], side, side, generator=torch.Generator().manual_seed(0))
    backend = "torch"
    if lib == "ldm":
        import ldm

        pipe = ldm.Pipeline.from_pretrained(a.folder, dtype=dtype)
        if tiny:
            pipe.load_vae(a.taesd)
        backend = pipe.backend

        def generate():
            return pipe(bc.PROMPT, steps=a.steps, guidance=1.0, sampler="lcm", height=a.size, width=a.size, seed=0,
                        latents=latents, progress=False, output_type="np")
    else:
        from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(a.folder, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        if tiny:
            pipe.vae = AutoencoderTiny.from_pretrained(a.taesd, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)

        def generate():
            with torch.inference_mode():
                return pipe(bc.PROMPT, num_inference_steps=a.steps, guidance_scale=1.0, height=a.size, width=a.size,
                            latents=latents, generator=torch.Generator().manual_seed(0), output_type="np").images
    load_peak = bc.peak_rss_mb()
    t0 = time.perf_counter()
    image = generate()                              # warm-up: allocator, kernel choice, OpenVINO compiling
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        generate()
        times.append(time.perf_counter() - t0)
    shape = list(getattr(image, "shape", ()))
    print(json.dumps({"s_per_image": bc.median(times) if times else None, "times": times, "first_s": first,
                      "peak_mb": bc.peak_rss_mb(), "load_peak_mb": load_peak, "backend": backend, "shape": shape}))


def cpu_line() -> str:
    """The CPU's model name (lscpu, else /proc/cpuinfo) and which of CPU_FLAGS /proc/cpuinfo lists."""
    import subprocess

    name = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                    None)
    except (OSError, subprocess.CalledProcessError):
        pass
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = name or bc.cpu_name().split(" (")[0]
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    found = [f for f in CPU_FLAGS if f in flags]
    return f"{name}; flags: {', '.join(found) if found else 'none of ' + '/'.join(CPU_FLAGS)}"


def versions() -> str:
    import torch

    parts = [f"torch {torch.__version__}"]
    for name in ("openvino", "diffusers"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", choices=["sd15", "tiny"],
                   help="sd15: SD 1.5's architecture (the docs row); tiny: a tiny random model with SD's "
                        "latent shape (bench_common.TINY_*), for a smoke test in seconds")
    p.add_argument("--size", type=int, default=512, help="image height and width in pixels (default 512)")
    p.add_argument("--steps", type=int, default=4, help="LCM steps (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up; the median is reported")
    p.add_argument("--threads", type=int, default=2, help="torch (and ldm's OpenVINO) threads in every child")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="which settings to run, in this order (default: all)")
    p.add_argument("--keep", type=Path, default=None,
                   help="build the weights folders (model and taesd/) under this directory once; reuse them later")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--taesd", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if a.size % 8:
        p.error(f"--size {a.size}: must be a multiple of 8 (the VAE's downscale)")
    print(f"# CPU: {cpu_line()}")
    print(f"# {versions()}; threads {a.threads}; {a.model} {a.size}x{a.size}, LCM {a.steps} steps, guidance 1, "
          f"batch 1, repeats {a.repeats}")
    print(f"# load average before: {bc.load_average()}")
    print("| setting | backend | s/image | vs diffusers SD VAE | first call s | peak MB | load MB |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = a.keep or Path(tmp)
        folder = bc.make_folder(a.model, root / a.model, reuse=a.keep is not None)
        taesd = make_taesd(root / f"{a.model}-taesd")
        base = None
        common = ["--folder", str(folder), "--taesd", str(taesd), "--size", str(a.size), "--steps", str(a.steps),
                  "--repeats", str(a.repeats), "--threads", str(a.threads)]
        for name in a.settings:
            r = bc.run_child(Path(__file__), ["--setting", name, *common])
            speed, ratio = "-", "-"
            if r["s_per_image"] is not None:
                speed = f"{r['s_per_image']:.3f}"
                if name == "diffusers-sdvae":
                    base = r["s_per_image"]
                if base:
                    ratio = f"{base / r['s_per_image']:.2f}x"
            print(f"| {SETTINGS[name][0]} | {r['backend']} | {speed} | {ratio} | {r['first_s']:.2f} | "
                  f"{r['peak_mb']:.0f} | {r['load_peak_mb']:.0f} |", flush=True)
    print(f"# load average after: {bc.load_average()}")


if __name__ == "__main__":
    main()
