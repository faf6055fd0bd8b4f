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

``--backend openvino`` profiles ldm on its OpenVINO backend: the components as above (the U-Net rows and the
decode timed around the compiled networks), and, in place of torch.profiler's operator kinds, OpenVINO's own
per-layer counters (PERF_COUNT, what ``benchmark_app -pc`` prints) of the last U-Net row and the last decode,
summed by the same kinds.
"""
from __future__ import annotations

import argparse
import contextlib
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
OV_KINDS = {  # OpenVINO CPU plugin layer types (ProfilingInfo.node_type) -> the kinds above
    "Convolution": "convolution", "MatMul": "matrix product", "FullyConnected": "matrix product",
    "ScaledDotProductAttention": "attention", "Softmax": "attention", "GroupNormalization": "normalisation",
    "MVN": "normalisation", "Reorder": "memory", "Transpose": "memory", "Reshape": "memory",
    "Concatenation": "memory", "Split": "memory", "Eltwise": "element-wise", "Subgraph": "element-wise",
    "Interpolate": "memory",
}


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
    """(generate(prompts, steps, size), stopwatch, pipe) for one library, its networks timed; ``ldm_options``:
    ldm's dtype / vae_dtype / backend."""
    pipe, generate = bc.load_pipeline(lib, folder, batch_invariant=not batched, **ldm_options)
    watch = Stopwatch()
    watch.wrap(pipe.text_encoder, "forward", "text encoder")
    if getattr(pipe, "backend", "torch") == "openvino":
        pipe.__dict__["_ov_unet"] = pipe._network
        watch.wrap(pipe, "_network", "U-Net")        # the compiled U-Net's rows, called by the denoiser
        watch.wrap(pipe, "decode_latents", "VAE decode")
    else:
        watch.wrap(pipe.unet, "forward", "U-Net")
        watch.wrap(pipe.vae, "decode", "VAE decode")
    return generate, watch, pipe


def openvino_counters(pipe, generate) -> dict[str, float]:
    """Seconds per operator kind from OpenVINO's per-layer counters (PERF_COUNT) of the last inference of each
    compiled network (one U-Net row, one decode). The counters cost time of their own, so they are taken in
    one more call, on graphs recompiled with them on, after the timed one."""
    from ldm.pipeline import openvino_backend as ovb

    networks = (pipe.__dict__["_ov_unet"], pipe.__dict__.get("_vae_runner"))
    ovb.OpenVINONetwork.extra_config = {"PERF_COUNT": "YES"}
    for network in networks:
        network._compiled.clear()
    generate()
    kinds = defaultdict(float)
    for network in networks:
        for requests in getattr(network, "_compiled", {}).values():
            for info in requests[0].profiling_info:
                if info.status.name == "EXECUTED":
                    kinds[OV_KINDS.get(info.node_type, "other operators")] += info.real_time.total_seconds()
    return dict(kinds)


def measure(lib: str, folder: Path, a) -> tuple[float, dict, dict]:
    """(wall seconds, seconds per component, self-CPU seconds per operator kind) of one measured call."""
    import torch

    options = {"dtype": a.dtype, "vae_dtype": a.vae_dtype, "backend": a.backend} if lib.startswith("ldm") else {}
    generate, watch, pipe = load(lib.split(" ")[0], folder, a.batched, **options)
    prompts = [bc.PROMPT] * a.batch
    generate(prompts, a.steps, a.size)               # warm-up: allocator, kernel choice, packing
    watch.seconds.clear()
    openvino = getattr(pipe, "backend", "torch") == "openvino"
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with contextlib.nullcontext() if openvino else profiler:
        t0 = time.perf_counter()
        generate(prompts, a.steps, a.size)
        wall = time.perf_counter() - t0
    components = {c: watch.seconds[c] for c in COMPONENTS}
    components["rest of the call"] = wall - sum(components.values())
    if openvino:      # one row's layers and one decode's: the per-kind split, not the call's total
        return wall, components, openvino_counters(pipe, lambda: generate(prompts, a.steps, a.size))
    kinds = defaultdict(float)
    for row in profiler.key_averages():
        kinds[kind_of(row.key)] += row.self_cpu_time_total / 1e6
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
    p.add_argument("--vae-dtype", default=None,
                   help="ldm's vae_dtype (default: ldm's own: bf16 under --dtype auto on a bf16 CPU, else float32)")
    p.add_argument("--backend", default="torch", choices=["torch", "openvino"], help="ldm's backend")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    a.size = a.size or (64 if a.model == "default" else 256)
    with tempfile.TemporaryDirectory() as tmp:
        folder = bc.make_folder(a.model, (a.keep or Path(tmp)) / a.model, reuse=a.keep is not None)
        ldm = ("ldm" if a.dtype is None else f"ldm {a.dtype} (VAE {a.vae_dtype})") + f" [{a.backend}]"
        results = {lib: measure(lib, folder, a) for lib in (ldm, "diffusers")}
    print(f"# {a.model}, {a.size}x{a.size}, batch {a.batch}, {a.steps} steps, {a.threads} thread(s), ldm "
          f"batch_invariant={not a.batched}; torch {torch.__version__}; load average {bc.load_average()}\n")
    print(table("by component", {k: (w, c) for k, (w, c, _) in results.items()},
                [*COMPONENTS, "rest of the call"]) + "\n")
    kinds = [k for k, _ in KINDS] + ["other operators", "not in operators"]
    print(table("by operator kind", {k: (w, o) for k, (w, _, o) in results.items()}, kinds))
    if a.backend == "openvino":
        print("\n(ldm on OpenVINO: operator kinds are OpenVINO's per-layer counters of ONE U-Net row and ONE decode, "
              "percentages of the whole call; diffusers: torch.profiler over the call)")


if __name__ == "__main__":
    main()
