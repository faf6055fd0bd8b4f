"""OpenVINO (optimum-intel) as a peer of scripts/bench_pipeline.py: the same diffusers folder, sampler and settings.

optimum-intel pins transformers/diffusers older than ldm's, so it lives in a venv of its own, and
bench_pipeline.py runs this script with that venv's interpreter (one subprocess per measurement):

    python -m venv --system-site-packages .venv-openvino && \
        .venv-openvino/bin/pip install "optimum-intel[openvino]==2.2.0" diffusers

    .venv-openvino/bin/python scripts/bench_openvino.py --export FOLDER IR_FOLDER     # once per weights folder
    .venv-openvino/bin/python scripts/bench_openvino.py --child --ir IR_FOLDER --shapes static --precision bf16 ...

The export (``OVStableDiffusionPipeline.from_pretrained(folder, export=True)``: torch.jit tracing to OpenVINO
IR) runs in its own process so that the measured process's peak RSS covers loading and generating only, as for
the other peers. "static" reshapes the networks to the request's batch and size before compiling (Intel's
advice for CPUs); "dynamic" compiles them for any shape. ``--precision`` is OpenVINO's
INFERENCE_PRECISION_HINT (bf16 runs natively only on CPUs with AVX-512 BF16 or AMX). DPM-Solver++ 2M, guidance
7.5, seed 0, as the other peers. Prints one JSON line last, as bench_common.run_child expects.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def export(folder: Path, ir: Path) -> None:
    from optimum.intel import OVStableDiffusionPipeline

    pipe = OVStableDiffusionPipeline.from_pretrained(str(folder), export=True, compile=False)
    pipe.save_pretrained(str(ir))


def child(a) -> None:
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from optimum.intel import OVStableDiffusionPipeline

    torch.set_num_threads(a.threads)
    config = {"INFERENCE_PRECISION_HINT": a.precision, "INFERENCE_NUM_THREADS": str(a.threads),
              "PERFORMANCE_HINT": "LATENCY"}
    pipe = OVStableDiffusionPipeline.from_pretrained(str(a.ir), ov_config=config, compile=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if a.shapes == "static":
        # one prompt, `batch` images of it (the peers' prompts are all the same): optimum reshapes its VAE
        # decoder to batch_size, not to the images it decodes
        pipe.reshape(batch_size=1, height=a.size, width=a.size, num_images_per_prompt=a.batch)
    pipe.compile()
    load_peak = bc.peak_rss_mb()

    def generate():
        return pipe(bc.PROMPT, num_images_per_prompt=a.batch, num_inference_steps=a.steps, guidance_scale=7.5,
                    height=a.size, width=a.size, generator=torch.Generator().manual_seed(0), output_type="np").images

    t0 = time.perf_counter()
    generate()                                   # warm-up
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        generate()
        times.append((time.perf_counter() - t0) / a.batch)
    print(json.dumps({"s_per_image": bc.median(times) if times else None, "times": times,
                      "peak_mb": bc.peak_rss_mb(), "load_peak_mb": load_peak, "first_s": first}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", nargs=2, type=Path, metavar=("FOLDER", "IR"), help="export FOLDER to IR and exit")
    p.add_argument("--child", action="store_true")
    p.add_argument("--ir", type=Path)
    p.add_argument("--shapes", choices=["static", "dynamic"], default="static")
    p.add_argument("--precision", choices=["bf16", "f32"], default="bf16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a, _ = p.parse_known_args()   # bench_pipeline passes its common flags to every peer
    if a.export:
        return export(*a.export)
    if not a.child or a.ir is None:
        p.error("give --export FOLDER IR, or --child --ir IR")
    child(a)


if __name__ == "__main__":
    main()
