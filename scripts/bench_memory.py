"""Measured working memory of a generation against ldm's estimate (ldm/pipeline/memory.py).

    python scripts/bench_memory.py                       # default model and SD 1.5 (random weights), a few sizes
    python scripts/bench_memory.py --model default --sizes 64 512 1024 --tiling

Each (model, size, tiling) runs in its own subprocess: it loads the pipeline, reads its resident set (VmRSS),
draws one image (1 step, guidance 7.5, so both guidance rows run), and reports the peak (VmHWM) above that
baseline beside ``ldm.pipeline.memory.estimate``. The estimate is meant to be an upper bound: the ratio
measured / estimated must stay below 1 for the refusal never to stop a request that would have fitted.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no /proc/self/status (Linux only)")


def child(folder: str, size: int, tiling: bool) -> dict:
    import torch

    import ldm
    from ldm.pipeline.memory import estimate

    torch.set_num_threads(2)
    pipe = ldm.Pipeline() if folder == "default" else ldm.Pipeline.from_pretrained(folder)
    if tiling:
        pipe.enable_vae_tiling()
    req = pipe.request("a turtle", None, 1, 7.5, "dpmpp_2m", size, size, seed=0)
    before = rss_mb()
    pipe("a turtle", steps=1, guidance=7.5, height=size, width=size, seed=0, progress=False, output_type="np")
    used = bc.peak_rss_mb() - before
    return {"measured_mb": round(used, 1), "estimated_mb": round(estimate(pipe, req).total / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["default", "sd15", "both"], default="both")
    p.add_argument("--sizes", type=int, nargs="+", help="image sides (default: per model)")
    p.add_argument("--tiling", action="store_true", help="also measure with VAE tiling at each size")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.child[2] == "1")))
        return
    print(f"CPU: {bc.cpu_name()}; load average {bc.load_average()}\n")
    print("| model | size | VAE tiling | measured MiB | estimated MiB | measured / estimated |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in (["default", "sd15"] if a.model == "both" else [a.model]):
            folder = "default" if model == "default" else str(bc.make_folder("sd15", Path(tmp) / "sd15"))
            sizes = a.sizes or ([64, 256, 512, 1024] if model == "default" else [256, 512])
            for size in sizes:
                for tiling in ([False, True] if a.tiling else [False]):
                    r = bc.run_child(Path(__file__), [folder, str(size), "1" if tiling else "0"])
                    ratio = r["measured_mb"] / r["estimated_mb"]
                    print(f"| {model} | {size}² | {'on' if tiling else 'off'} | {r['measured_mb']:.0f} | "
                          f"{r['estimated_mb']:.0f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
