"""One 3×3 convolution layer, plain nn.Conv2d vs ldm's packed-weight path (ldm/models/conv.py), channels-last,
fp32 and bf16, at the layer shapes of SD 1.5's U-Net and VAE decoder at 256². Tells where PACK_MAX_POSITIONS
should sit on this CPU.

    PYTHONPATH=. python scripts/bench_conv.py --threads 2

Each figure is the best of three 0.5 s timing windows, plain and packed alternating.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402
from ldm.models import conv  # noqa: E402

# (batch, in channels, out channels, side): U-Net levels 1-2 under CFG, VAE decoder levels at 256² output
SHAPES = [(2, 320, 320, 32), (2, 640, 640, 16), (1, 512, 512, 64), (1, 256, 256, 128), (1, 128, 128, 256),
          (1, 512, 512, 32)]


def seconds_per_call(layer, x, window: float) -> float:
    layer(x)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < window:
        layer(x)
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=float, default=0.5, help="seconds per timing window")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"# {bc.cpu_name()}; torch {torch.__version__}, threads {a.threads}")
    print("| dtype | batch | channels | map | plain ms | plain GFLOP/s | packed ms | plain / packed |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for b, ci, co, side in SHAPES:
            layer = conv.Conv2d(ci, co, 3, padding=1).to(dtype)
            x = torch.randn(b, ci, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
            best = {}
            with torch.no_grad():
                for mode in ("plain", "packed") * 3:
                    layer.pack_max_positions = 10**12 if mode == "packed" else 0   # this layer only
                    best[mode] = min(best.get(mode, float("inf")), seconds_per_call(layer, x, a.window))
            gflop = 2 * b * side * side * ci * co * 9 / 1e9
            print(f"| {str(dtype).removeprefix('torch.')} | {b} | {ci}→{co} | {side}² | {best['plain'] * 1e3:.1f} "
                  f"| {gflop / best['plain']:.0f} | {best['packed'] * 1e3:.1f} | "
                  f"{best['plain'] / best['packed']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
