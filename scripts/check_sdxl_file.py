"""Full-size SDXL single-file check: the released SDXL base architecture with random weights, converted to the
released single-file layout the way diffusers' conversion script writes it, loaded by ldm from that file alone,
draws the image diffusers draws from the source folder.

    PYTHONPATH=. python scripts/check_sdxl_file.py --work /tmp/sdxl_check               # fp32 storage (~14 GB a copy)
    PYTHONPATH=. python scripts/check_sdxl_file.py --work /tmp/sdxl_check --storage float16 --size 256 --steps 2
    PYTHONPATH=. python scripts/check_sdxl_file.py --work /tmp/sdxl_check --storage float16 --file-storage float32
                                          # a float32 file from a float16 folder: 21 GB of disk instead of 28

Steps, each in its own process (so that each peak RSS, VmHWM, belongs to one step): build the diffusers folder
(diffusers/transformers classes, seeded random init, one component at a time), convert it to a single file
(tests/sdxl_reference.py: diffusers' scripts/convert_diffusers_to_original_sdxl.py tables; the projection stored as
the released files store it), generate with diffusers' StableDiffusionXLPipeline (DDIM) on the folder, and with
ldm (sampler="ddim") on the file with HF_HUB_OFFLINE=1, in a folder holding nothing else. Prints per step the
wall time and peak RSS, and the largest pixel difference. Both compute in float32 whatever the storage dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))   # the reference conversion and configs
import bench_common as bc  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def build(a) -> dict:
    import torch

    bc.make_folder("sdxl", Path(a.work) / "folder", a.seed, dtype=getattr(torch, a.storage))
    return {}


def write_safetensors_streaming(path: Path, tensors: dict, dtype=None) -> None:
    """A safetensors file written tensor by tensor (safetensors' save_file serialises everything in memory first,
    a second copy of 14 GB): the 8-byte header length, the JSON header, then each tensor's bytes in order, each
    cast to ``dtype`` (when given) only as it is written."""
    header, offset = {}, 0
    for name, t in tensors.items():
        kind = dtype or t.dtype
        size = t.numel() * kind.itemsize
        header[name] = {"dtype": _DTYPES[str(kind).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            t = t.to(dtype) if dtype is not None else t
            f.write(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())


def convert(a) -> dict:
    import torch
    from sdxl_reference import convert_folder

    out = Path(a.work) / "alone"
    out.mkdir(exist_ok=True)
    write_safetensors_streaming(out / "sdxl_base.safetensors",
                                convert_folder(Path(a.work) / "folder", released_projection=True),
                                getattr(torch, a.file_storage or a.storage))
    return {"file_gb": round((out / "sdxl_base.safetensors").stat().st_size / 1e9, 2)}


def generate(a) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    latents = torch.randn(1, 4, a.size // 8, a.size // 8, generator=torch.Generator().manual_seed(a.seed))
    start = time.perf_counter()
    if a.step == "diffusers":
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(Path(a.work) / "folder", torch_dtype=torch.float32)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                                   set_alpha_to_one=False)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter()
        image = pipe(PROMPT, num_inference_steps=a.steps, guidance_scale=5.0, latents=latents, height=a.size,
                     width=a.size, output_type="np").images
    else:
        from ldm import Pipeline

        pipe = Pipeline.from_pretrained(Path(a.work) / "alone" / "sdxl_base.safetensors")
        loaded = time.perf_counter()
        image = pipe(PROMPT, steps=a.steps, guidance=5.0, sampler="ddim", latents=latents, height=a.size,
                     width=a.size, output_type="np", progress=False)
    done = time.perf_counter()
    np.save(Path(a.work) / f"{a.step}.npy", image)
    return {"load_s": round(loaded - start, 1), "generate_s": round(done - loaded, 1)}


def child(a) -> None:
    start = time.perf_counter()
    result = {"build": build, "convert": convert}.get(a.step, generate)(a)
    result.update(wall_s=round(time.perf_counter() - start, 1), peak_rss_gb=round(bc.peak_rss_mb() / 1024, 2))
    print(json.dumps(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="a folder with room for two copies of the weights")
    p.add_argument("--storage", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--file-storage", choices=sorted(_DTYPES), help="the single file's dtype (default: --storage)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps-to-run", nargs="+", default=["build", "convert", "diffusers", "ldm"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--step", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a)
        return 0
    Path(a.work).mkdir(parents=True, exist_ok=True)
    common = ["--work", a.work, "--storage", a.storage, *(["--file-storage", a.file_storage] if a.file_storage else []),
              "--size", str(a.size), "--steps", str(a.steps),
              "--seed", str(a.seed), "--threads", str(a.threads)]
    os.environ["HF_HUB_OFFLINE"] = "1"              # nothing may be fetched: the file alone must do
    for step in a.steps_to_run:
        print(step, bc.run_child(Path(__file__), [*common, "--step", step]), flush=True)
    if {"diffusers", "ldm"} <= set(a.steps_to_run):
        import numpy as np

        ours, theirs = (np.load(Path(a.work) / f"{s}.npy") for s in ("ldm", "diffusers"))
        diff = float(np.abs(ours - theirs).max())
        print(f"max pixel difference {diff:.2e} ({diff * 255:.3f}/255); image mean {theirs.mean():.3f}, "
              f"std {theirs.std():.3f}; {'OK' if diff <= 2 / 255 else 'MISMATCH'}")
        return 0 if diff <= 2 / 255 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
