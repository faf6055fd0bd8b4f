"""Full-size SD 1.5 ControlNet file check: lllyasviel's original layout (``control_model.*``, float32, random
weights, 1.45 GB) loads offline from the file alone, and computes what diffusers' ControlNetModel computes with
the same weights.

    PYTHONPATH=. python scripts/check_control_file.py --work /tmp/control_check [--size 256]

Steps, each in its own process (so each peak RSS is its own): write the file (diffusers' default ControlNetModel
config with SD 1.5's context width, 768; tests/model_parity.random_state weights, big kernels of one shape sharing
a tensor; keys as the inverse of diffusers' conversion, tests/control_fixtures.py), then load it with ldm
(HF_HUB_OFFLINE=1, nothing beside the file; the base U-Net's config only, on the meta device) and run one forward
at ``--size`` pixels beside diffusers' ControlNetModel holding the same weights. Prints wall time, peak RSS and
the largest relative difference of the residuals.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
SEED = 0


def _reference():
    from diffusers import ControlNetModel

    from model_parity import random_state

    model = ControlNetModel(cross_attention_dim=768)   # diffusers' defaults + SD 1.5's context: SD 1.5's ControlNet
    model.load_state_dict(random_state(model, SEED, tie_big=True))
    return model.eval()


def write(work: Path) -> dict:
    from control_fixtures import write_original_controlnet

    path = write_original_controlnet(_reference(), work / "control_sd15_random.safetensors")
    return {"file": str(path), "bytes": path.stat().st_size}


def load(work: Path, size: int) -> dict:
    import torch

    from ldm.checkpoints.control import load_control
    from ldm.models.unet import UNet, UNetConfig

    with torch.device("meta"):
        base = UNet(UNetConfig())       # SD 1.5's U-Net: its config is all load_control reads
    start = time.perf_counter()
    model = load_control(work / "control_sd15_random.safetensors", base, dtype=torch.float32)
    seconds = time.perf_counter() - start
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    generator = torch.Generator().manual_seed(1)
    h = size // 8
    x, hint = torch.randn(1, 4, h, h, generator=generator), torch.rand(1, 3, size, size, generator=generator)
    context, t = torch.randn(1, 77, 768, generator=generator), torch.tensor([500])
    with torch.no_grad():
        down, mid = model(x, t, context, hint)
        theirs_down, theirs_mid = _reference()(x, t, context, hint, return_dict=False)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip([*down, mid], [*theirs_down, theirs_mid]))
    return {"load_seconds": round(seconds, 2), "peak_rss_mb_after_load": round(rss_loaded),
            "max_rel_diff_vs_diffusers": err, "config": model.config.to_dict()["block_out_channels"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--step", choices=["write", "load"], help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.step:
        out = write(a.work) if a.step == "write" else load(a.work, a.size)
        print(json.dumps(out))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    for step in ("write", "load"):
        start = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--work", str(a.work), "--size", str(a.size), "--step", step],
                             capture_output=True, text=True, env=env, cwd=a.work)
        if run.returncode:
            sys.exit(f"{step} failed:\n{run.stderr[-3000:]}")
        print(step, f"{time.perf_counter() - start:.1f} s", run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
