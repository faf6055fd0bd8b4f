"""Benchmark ldm's samplers against diffusers' schedulers on data whose exact denoiser is known.

The data is a 2-D Gaussian mixture (tests/gaussian.py), so E[x0 | x_σ] is closed form and every sampler is
given a perfect model: the only errors left are the sampler's own (discretisation, and for ancestral/SDE
samplers the randomness they add).  The exact denoiser is wrapped as a VP ε-network on Stable Diffusion's
training schedule, so ldm (through ldm.denoiser.Denoiser) and diffusers see the same network, including
the rounding of timesteps to integers.

For each sampler and budget of network evaluations (NFE), it draws 10k samples and reports their sliced
Wasserstein-2 distance to the true mixture (exact projected quantiles, not another finite draw).  The noise
floor is the same distance for 10k exact i.i.d. draws from the mixture: a perfect sampler scores about that.

    PYTHONPATH=. python scripts/bench_samplers.py            # writes docs/samplers.png and the table in
                                                             # docs/samplers.md (between the bench markers)
"""

from __future__ import annotations

import argparse
import inspect
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the analytic mixture is a shared test fixture
sys.path.insert(0, str(ROOT))

from gaussian import GaussianMixture  # noqa: E402

from ldm.denoiser import Denoiser  # noqa: E402
from ldm.samplers import SAMPLERS, schedule_hints_of  # noqa: E402
from ldm.schedules import NoiseSchedule, ScheduleConfig  # noqa: E402
from torch import Tensor  # noqa: E402

NFES = (5, 10, 20, 50, 100)
TWO_EVAL = {"heun", "dpm_2", "dpmpp_2s_a", "dpmpp_sde"}  # two evaluations per step (one on the last, to σ = 0)
# Consistency samplers need a consistency-distilled model; the exact posterior mean is not one (lcm's jumps to
# E[x0 | x] shrink the spread), and tcd with its default γ = 0 is ddim. Not benchmarked here.
SKIP = {"lcm", "tcd"}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def mixture() -> GaussianMixture:
    """Six tight modes on a ring of radius 1.5 plus a broad anisotropic one in the middle, unequal weights."""
    angles = torch.arange(6, dtype=torch.float64) * (2 * math.pi / 6)
    ring = torch.stack([1.5 * angles.cos(), 1.5 * angles.sin()], dim=1)
    means = torch.cat([ring, torch.zeros(1, 2, dtype=torch.float64)])
    stds = torch.cat([torch.full((6, 2), 0.08, dtype=torch.float64),
                      torch.tensor([[0.35, 0.15]], dtype=torch.float64)])
    weights = [0.2, 0.1, 0.15, 0.1, 0.15, 0.1, 0.2]
    return GaussianMixture(weights, means, stds)


def projected_quantiles(data: GaussianMixture, directions: Tensor, n: int, iterations: int = 45) -> Tensor:
    """Exact quantiles at levels (i + ½)/n of the mixture projected on each direction: (directions, n).

    A projection of a Gaussian mixture is a 1-D Gaussian mixture; its CDF is inverted by bisection.
    """
    means = directions @ data.means.T  # (L, K)
    stds = ((directions**2) @ (data.stds**2).T).sqrt()  # (L, K)
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    lo = (means - 10 * stds).amin(1, keepdim=True).expand(-1, n).clone()
    hi = (means + 10 * stds).amax(1, keepdim=True).expand(-1, n).clone()
    for _ in range(iterations):
        mid = (lo + hi) / 2
        z = (mid[..., None] - means[:, None]) / stds[:, None]  # (L, n, K)
        cdf = (data.weights * 0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(-1)
        below = cdf < levels
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


def sliced_wasserstein(samples: Tensor, directions: Tensor, quantiles: Tensor) -> float:
    """SW₂ of an empirical sample to the exact mixture: the root mean over directions of the squared 1-D
    Wasserstein-2 distance, ∫ (F_sample⁻¹(u) − F⁻¹(u))² du with the sorted projections as F_sample⁻¹."""
    projected = (samples.double() @ directions.T).sort(0).values.T  # (L, n)
    return float(((projected - quantiles) ** 2).mean().sqrt())


def sliced_wasserstein_samples(a: Tensor, b: Tensor, directions: Tensor) -> float:
    """SW₂ between two equal-size samples."""
    pa, pb = (a.double() @ directions.T).sort(0).values, (b.double() @ directions.T).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


class Counter:
    """Counts network evaluations (one per call, whatever the batch size)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def run_ldm(name, net, schedule, steps, spacing, n, seed, **options):
    counter = Counter(net)
    # integer timesteps unless the sampler's hint says otherwise (lms: fractional), as the pipeline runs it
    denoiser = Denoiser(counter, schedule, quantize=schedule_hints_of(name).get("quantize", True))
    final = "alpha0" if spacing == "leading" else "zero"
    sigmas = schedule.sigmas_for(steps, spacing, final=final)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) * float(sigmas[0])
    out = SAMPLERS[name](denoiser, x, sigmas, generator=g, **options)
    if final == "alpha0":  # VE at σ(ᾱ_0) -> the VP sample diffusers' DDIM returns
        out = out / math.sqrt(1 + float(sigmas[-1]) ** 2)
    return out, counter.calls


def run_diffusers(scheduler, net, steps, n, seed):
    counter = Counter(net)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) * scheduler.init_noise_sigma
    noise = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        eps = counter(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **noise).prev_sample
    return x, counter.calls


def diffusers_schedulers(config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    sd = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    return {
        "diffusers DDIM (leading)": lambda: DDIMScheduler(**config),
        "diffusers DPM++ 2M (Karras)": lambda: DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True, **sd),
        "diffusers Euler (Karras)": lambda: EulerDiscreteScheduler(use_karras_sigmas=True, **sd),
        "diffusers UniPC (Karras)": lambda: UniPCMultistepScheduler(use_karras_sigmas=True, **sd),
    }


DETERMINISTIC = ("euler", "heun", "dpm_2", "dpmpp_2m", "unipc", "lms")


def bench(n: int, seed: int) -> dict:
    schedule = NoiseSchedule(ScheduleConfig())
    data = mixture()
    net = data.eps_model(schedule)
    directions = torch.randn(128, 2, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    quantiles = projected_quantiles(data, directions, n)
    draws = [data.sample(n, torch.Generator().manual_seed(seed + 1000 + k)) for k in range(6)]

    def distance(samples):
        return sliced_wasserstein(samples, directions, quantiles)

    result = {"floor": [distance(d) for d in draws], "pair": sliced_wasserstein_samples(draws[0], draws[1], directions),
              "sample": draws[0], "sw": {}, "ode_error": {}, "references": {}}
    # The converged probability-flow solution from the same starting noise as every Karras-spaced run below.
    ode_reference, _ = run_ldm("dpmpp_2m", net, schedule, 1000, "karras", n, seed)
    ancestral_reference, _ = run_ldm("ddpm", net, schedule, 1000, "trailing", n, seed)
    result["references"] = {"dpmpp_2m, 1000 Karras steps (ODE)": distance(ode_reference),
                            "ddpm, all 1000 timesteps": distance(ancestral_reference)}
    print(result["references"], flush=True)

    ours = [(name, name, "karras") for name in SAMPLERS if name not in SKIP] + [("ddim (leading)", "ddim", "leading")]
    for label, name, spacing in ours:
        result["sw"][label] = []
        for budget in NFES:
            steps = (budget + 1) // 2 if name in TWO_EVAL else budget
            out, nfe = run_ldm(name, net, schedule, steps, spacing, n, seed)
            result["sw"][label].append((nfe, distance(out)))
            if name in DETERMINISTIC and spacing == "karras":
                rms = float((out.double() - ode_reference.double()).pow(2).sum(1).mean().sqrt())
                result["ode_error"].setdefault(label, []).append((nfe, rms))
        print(label, [f"{d:.4f}" for _, d in result["sw"][label]], flush=True)
    for label, make in diffusers_schedulers(schedule.config.to_dict()).items():
        result["sw"][label] = []
        for budget in NFES:
            out, nfe = run_diffusers(make(), net, budget, n, seed)
            result["sw"][label].append((nfe, distance(out)))
        print(label, [f"{d:.4f}" for _, d in result["sw"][label]], flush=True)
    return result


def _table(rows: dict, fmt: str) -> list[str]:
    lines = ["| sampler | " + " | ".join(f"NFE {b}" for b in NFES) + " |", "|---|" + "---:|" * len(NFES)]
    for label, results in rows.items():
        cells = [format(d, fmt) + (f" ({nfe})" if nfe != b else "") for (nfe, d), b in zip(results, NFES)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(result: dict, n: int, seconds: float) -> str:
    floor = torch.tensor(result["floor"])
    k = n // 1000
    return "\n".join([
        f"**Sliced Wasserstein-2 distance to the mixture** ({k}k samples, 128 directions; lower is better; in "
        "parentheses the actual NFE where it differs from the column's):",
        "",
        *_table(result["sw"], ".3f"),
        "",
        *(f"- reference, {label}: **{d:.3f}**" for label, d in result["references"].items()),
        f"- noise floor, {k}k exact i.i.d. draws from the mixture: **{floor.mean():.3f}** "
        f"(min {floor.min():.3f}, max {floor.max():.3f} over {len(floor)} draws)",
        f"- for comparison, SW₂ between two independent {k}k draws: {result['pair']:.3f}",
        "",
        "**Deterministic samplers: RMS distance per sample to the converged ODE solution** from the same starting "
        "noise (dpmpp_2m with 1000 Karras steps); no sampling noise, so this shows the discretisation error alone:",
        "",
        *_table(result["ode_error"], ".2e"),
        "",
        f"Machine: {platform.machine()} {platform.system()}, CPython {platform.python_version()}, torch "
        f"{torch.__version__} on {torch.get_num_threads()} CPU thread(s), shared with other jobs; whole run "
        f"{seconds:.0f} s.",
    ])


def plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_ode, ax_data) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1.5, 1, 0.8]})
    colors = plt.get_cmap("tab20").colors
    for (label, results), color in zip(result["sw"].items(), colors[::2] + colors[1::2]):
        style = "--" if label.startswith("diffusers") else "-"
        ax.plot([r[0] for r in results], [r[1] for r in results], style, color=color, marker="o", ms=3,
                label=label)
    floor = result["floor"]
    ax.axhspan(min(floor), max(floor), color="k", alpha=0.1, label="noise floor (i.i.d. draws, min-max)")
    for (label, d), color in zip(result["references"].items(), ("gray", "silver")):
        ax.axhline(d, color=color, lw=1, label=f"reference: {label}")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel="sliced W₂ to the mixture",
           title="Distance to the data distribution")
    ax.legend(fontsize=7, ncol=2)
    for label, results in result["ode_error"].items():
        ax_ode.plot([r[0] for r in results], [r[1] for r in results], marker="o", ms=3, label=label)
    ax_ode.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)",
               ylabel="RMS distance to the converged ODE solution", title="ODE samplers: discretisation error")
    ax_ode.legend(fontsize=7)
    shown = result["sample"][:3000]
    ax_data.scatter(shown[:, 0], shown[:, 1], s=1, alpha=0.4)
    ax_data.set(title="the data (3k exact draws)", aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny tensors: 1 is fastest)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "samplers.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "samplers.png")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = bench(args.samples, args.seed)
    table = markdown(result, args.samples, time.perf_counter() - start)
    print(table)
    if args.no_write:
        return
    plot(result, args.plot)
    text = args.doc.read_text() if args.doc.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.doc}: no {BEGIN} ... {END} markers to put the table between")
    head, rest = text.split(BEGIN, 1)
    args.doc.write_text(head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote {args.plot} and the table in {args.doc}")


if __name__ == "__main__":
    main()
