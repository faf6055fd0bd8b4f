"""Where a text-to-image call spends its time, ldm beside diffusers on the same weights (issue 5).

    PYTHONPATH=. python scripts/bench_profile.py --model default --batch 4 --steps 10
    PYTHONPATH=. python scripts/bench_profile.py --model sd15 --steps 2 --threads 2 --keep /tmp/bench_keep
    PYTHONPATH=. python scripts/bench_profile.py --model sd15 --steps 4 --dtype bfloat16 --vae-dtype bfloat16

Two tables in Markdown, one row per library:
  * by component: text encoding, the U-Net calls, VAE decode, and the rest of the call (sampler arithmetic,
    Python around the networks), timed with wall clocks around each network;
  * by kind of operator, over the whole call (torch.profiler, self CPU time): convolutions, matrix products
    (linear layers, 1×1 projections), attention (SDPA and its softmax/bmm), normalisation, element-wise, and
    memory (copies, layout changes, allocation); "not in operators" is the wall time no operator accounts for
    (Python and dispatch overhead; with one thread, the profile's own cost is in there too).
Both libraries sample with DPM-Solver++ 2M at guidance 7.5, as scripts/bench_pipeline.py does; ldm with its
default batch_invariant, or ``--batched``. One warm-up call precedes the measured one.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

KINDS = [  # (kind, substrings of aten/mkldnn operator names), first match wins
    ("convolution", ("conv",)),
    ("attention", ("scaled_dot_product", "softmax", "bmm", "baddbmm", "_flash_attention", "_efficient_attention")),
    ("matrix product", ("addmm", "aten::mm", "matmul", "linear")),
    ("normalisation", ("group_norm", "layer_norm", "batch_norm")),
    ("memory", ("copy_", "contiguous", "empty", "clone", "cat", "to_dense", "reorder", "_to_copy", "resize_")),
    ("element-wise", ("add", "mul", "silu", "gelu", "sub", "div", "sigmoid", "exp", "pow", "sqrt", "clamp",
                      "where", "tanh", "neg", "rsqrt", "cos", "sin", "fill_", "lerp")),
]
COMPONENTS = ("text encoder", "U-Net", "VAE decode")


def kind_of(name: str) -> str:
    for kind, parts in KINDS:
        if any(p in name for p in parts):
            return kind
    return "other operators"


class Stopwatch:
    """Wall seconds spent inside wrapped callables, per component."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def wrap(self, obj, attr: str, component: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[component] += time.perf_counter() - t0

        setattr(obj, attr, timed)


def load(lib: str, folder: Path, batched: bool, **ldm_options):
    """(generate(prompts, steps, size), stopwatch) for one library, its networks timed; ``ldm_options``: ldm's
    dtype / vae_dtype."""
    pipe, generate = bc.load_pipeline(lib, folder, batch_invariant=not batched, **ldm_options)
    watch = Stopwatch()
    watch.wrap(pipe.text_encoder, "forward", "text encoder")
    watch.wrap(pipe.unet, "forward", "U-Net")
    watch.wrap(pipe.vae, "decode", "VAE decode")
    return generate, watch


def measure(lib: str, folder: Path, a) -> tuple[float, dict, dict]:
    """(wall seconds, seconds per component, self-CPU seconds per operator kind) of one measured call."""
    import torch

    options = {"dtype": a.dtype, "vae_dtype": a.vae_dtype} if lib.startswith("ldm") else {}
    generate, watch = load(lib.split(" ")[0], folder, a.batched, **options)
    prompts = [bc.PROMPT] * a.batch
    generate(prompts, a.steps, a.size)               # warm-up: allocator, kernel choice, packing
    watch.seconds.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        generate(prompts, a.steps, a.size)
        wall = time.perf_counter() - t0
    kinds = defaultdict(float)
    for row in prof.key_averages():
        kinds[kind_of(row.key)] += row.self_cpu_time_total / 1e6
    components = {c: watch.seconds[c] for c in COMPONENTS}
    components["rest of the call"] = wall - sum(components.values())
    kinds["not in operators"] = max(0.0, wall - sum(kinds.values()))
    return wall, components, dict(kinds)


def table(title: str, rows: dict[str, tuple[float, dict]], columns: list[str]) -> str:
    lines = [f"| {title} | total s | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for lib, (wall, parts) in rows.items():
        cells = [f"{parts.get(c, 0.0):.3f} ({100 * parts.get(c, 0.0) / wall:.0f} %)" for c in columns]
        lines.append(f"| {lib} | {wall:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="default", choices=["default", "sd15"])
    p.add_argument("--size", type=int, default=None, help="image side (default: 64 for default, 256 for sd15)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batched", action="store_true", help="ldm with batch_invariant=False")
    p.add_argument("--keep", type=Path, default=None, help="build the weights folder here once and reuse it")
    p.add_argument("--dtype", default=None, help="ldm's dtype (bfloat16, auto, ...; default float32)")
    p.add_argument("--vae-dtype", default="float32", help="ldm's vae_dtype")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    a.size = a.size or (64 if a.model == "default" else 256)
    with tempfile.TemporaryDirectory() as tmp:
        folder = bc.make_folder(a.model, (a.keep or Path(tmp)) / a.model, reuse=a.keep is not None)
        ldm = "ldm" if a.dtype is None else f"ldm {a.dtype} (VAE {a.vae_dtype})"
        results = {lib: measure(lib, folder, a) for lib in (ldm, "diffusers")}
    print(f"# {a.model}, {a.size}x{a.size}, batch {a.batch}, {a.steps} steps, {a.threads} thread(s), ldm "
          f"batch_invariant={not a.batched}; torch {torch.__version__}; load average {bc.load_average()}\n")
    print(table("by component", {k: (w, c) for k, (w, c, _) in results.items()},
                [*COMPONENTS, "rest of the call"]) + "\n")
    kinds = [k for k, _ in KINDS] + ["other operators", "not in operators"]
    print(table("by operator kind", {k: (w, o) for k, (w, _, o) in results.items()}, kinds))


if __name__ == "__main__":
    main()
