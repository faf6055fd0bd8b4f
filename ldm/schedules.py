"""Noise schedules: β schedules, ᾱ ↔ σ ↔ t, inference step spacings, and the forward process.

Sampling works in σ-space (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): x = x0 + σ·n.  A discrete variance-preserving (VP) model (Ho et al. 2020) trained on
x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·n sees the same point as x_t = x / sqrt(1 + σ²) at the timestep t whose
σ_t = sqrt((1 − ᾱ_t) / ᾱ_t).  All schedule arithmetic here is float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DISCRETE_SPACINGS = ("leading", "trailing", "linspace")
CONTINUOUS_SPACINGS = ("karras", "exponential")
# The community schedules (ComfyUI's scheduler names; A1111's "SGM Uniform", "Simple", "Beta", "Align Your Steps"):
# integer-timestep grids ("lcm", "simple", "beta") and σ lists ("sgm_uniform", "ays", "ays_sdxl").
FEW_STEP_SPACINGS = ("lcm", "sgm_uniform", "simple", "beta", "ays", "ays_sdxl")
SPACINGS = DISCRETE_SPACINGS + CONTINUOUS_SPACINGS + FEW_STEP_SPACINGS
# LCMScheduler / TCDScheduler: the grid the consistency model was distilled on (original_inference_steps).
LCM_ORIGINAL_STEPS = 50
# The beta schedule's shape, Beta(0.6, 0.6) (Lee et al. 2024, "Beta Sampling is All You Need"; ComfyUI's default).
BETA_ALPHA = BETA_BETA = 0.6
# Align Your Steps (Sabour et al. 2024, "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models"):
# the published 10-step σ schedules (11 levels), as NVIDIA's how-to page and ComfyUI's
# comfy_extras/nodes_align_your_steps.py list them.  Other step counts interpolate them log-linearly.
AYS_SIGMAS = {
    "ays": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),                      # SD 1.5
    "ays_sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),   # SDXL
}
# A spacing that depends on the model family: (spacing, family) -> the spacing that family uses.
FAMILY_SPACINGS = {("ays", "sdxl"): "ays_sdxl", ("ays", "sdxl_refiner"): "ays_sdxl"}
CONVENTIONS = ("ddim", "dpmsolver")

# With a zero-terminal-SNR schedule ᾱ_{T-1} = 0 and σ_max = ∞.  Like diffusers' Euler/DPM-Solver/UniPC
# schedulers (scheduling_euler_discrete.py: `alphas_cumprod[-1] = 2**-24`, "FP16 smallest positive subnormal"),
# the σ table clamps that ᾱ to 2⁻²⁴, so σ_max = sqrt((1 − 2⁻²⁴)/2⁻²⁴) ≈ 4096.  ComfyUI
# (comfy/model_sampling.py, rescale_zero_terminal_snr_sigmas) uses 4.8973451890853435e-08 (σ_max ≈ 4519) to the
# same end.  `alphas_cumprod` itself keeps the exact 0 (training targets and q_sample need it).
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def make_betas(kind: str = "scaled_linear", num_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> Tensor:
    """β_1..β_T (float64) for the named schedule."""
    if kind == "cosine":
        kind = "squaredcos_cap_v2"
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if kind == "linear":
        # Ho et al. 2020, §4: β linear from 1e-4 to 0.02.
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        # Latent diffusion (Rombach et al. 2022): linear in sqrt(β).
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, and
        # β_t = 1 − ᾱ(t)/ᾱ(t−1) capped at 0.999 so the last steps stay finite.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                 for i in range(num_timesteps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; known: {', '.join(BETA_SCHEDULES)} (alias 'cosine')")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1.

    Shift sqrt(ᾱ) so its last value is 0 (zero terminal SNR: the last step is pure noise) and scale it so its
    first value is unchanged, then convert back to β.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule of a model; field names are diffusers' scheduler_config.json keys."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    set_alpha_to_one: bool = False

    def __post_init__(self):
        if self.beta_schedule == "cosine":
            object.__setattr__(self, "beta_schedule", "squaredcos_cap_v2")
        checks = (("beta_schedule", BETA_SCHEDULES), ("prediction_type", PREDICTION_TYPES),
                  ("timestep_spacing", DISCRETE_SPACINGS))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"ScheduleConfig.{name}={getattr(self, name)!r} is not one of {allowed}")
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"ScheduleConfig.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 <= int(self.steps_offset) < int(self.num_train_timesteps):
            raise ValueError(f"ScheduleConfig.steps_offset={self.steps_offset} is outside [0, num_train_timesteps)")

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        """Build from a diffusers scheduler config; keys this class does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        """A dict that DDIMScheduler(**d) accepts (clip_sample off: ldm never clips x0)."""
        return {**asdict(self), "clip_sample": False}


def _as_float64(value) -> Tensor:
    if torch.is_tensor(value):
        return value.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(value, dtype=torch.float64)


class NoiseSchedule:
    """A discrete VP schedule and its σ table, with conversions and inference step spacings."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        betas = make_betas(config.beta_schedule, config.num_train_timesteps, config.beta_start, config.beta_end)
        if config.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        ab = self.alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_CUMPROD)
        self.sigmas = ((1.0 - ab) / ab).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    @property
    def num_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def sigma_to_t(self, sigma) -> Tensor:
        """Fractional timestep of σ, by linear interpolation in log σ (as k-diffusion and diffusers do).

        σ outside [sigma_min, sigma_max] clamps to t = 0 or T − 1.
        """
        log_sigma = _as_float64(sigma).log()
        ls = self.log_sigmas
        low = (torch.searchsorted(ls, log_sigma.contiguous(), right=True) - 1).clamp(0, len(ls) - 2)
        w = ((log_sigma - ls[low]) / (ls[low + 1] - ls[low])).clamp(0.0, 1.0)
        return low.to(torch.float64) + w

    def t_to_sigma(self, t) -> Tensor:
        """σ at a (fractional) timestep, interpolating log σ linearly between integer timesteps."""
        t = _as_float64(t).clamp(0.0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low.to(torch.float64)
        return ((1.0 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def timesteps(self, steps: int, spacing: str | None = None, *, convention: str = "ddim") -> Tensor:
        """Descending integer timesteps for `steps` inference steps.

        The formulas are diffusers' (spacings from Lin et al. 2023, Table 2).  convention="ddim" is
        DDIMScheduler/DDPMScheduler.set_timesteps; convention="dpmsolver" is DPMSolverMultistepScheduler's, which
        lays out steps + 1 points and drops the last ("linspace" and "leading" differ; "trailing" is the same).
        """
        spacing = spacing or self.config.timestep_spacing
        _check_steps(steps)
        if spacing not in DISCRETE_SPACINGS:
            raise ValueError(f"timesteps(): spacing {spacing!r} is not one of {DISCRETE_SPACINGS}")
        if convention not in CONVENTIONS:
            raise ValueError(f"timesteps(): convention {convention!r} is not one of {CONVENTIONS}")
        T, n = self.num_timesteps, steps
        if n > T:
            raise ValueError(f"steps={n} exceeds num_train_timesteps={T}")
        extra = 1 if convention == "dpmsolver" else 0
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n + extra).round()[::-1][:n]
        elif spacing == "leading":
            ratio = T // (n + extra)
            ts = (np.arange(0, n + extra) * ratio).round()[::-1][:n] + self.config.steps_offset
        else:  # trailing: T − i·T/n, rounded, minus one (diffusers' np.arange(T, 0, −T/n), n points exactly)
            ts = np.round(T - np.arange(n) * (T / n)) - 1
        ts = torch.from_numpy(ts.astype(np.int64).copy())
        if int(ts.max()) > T - 1 or int(ts.min()) < 0 or len(ts) != n:
            raise ValueError(f"{spacing!r} spacing with steps={n}, steps_offset={self.config.steps_offset} "
                             f"gives timesteps outside [0, {T - 1}]: {ts.tolist()}")
        return ts

    def sigmas_for(self, steps: int, spacing: str | None = None, *, final: str = "zero", rho: float = 7.0,
                   convention: str = "ddim") -> Tensor:
        """The σ sequence for a sampler: `steps` noise levels, decreasing, then the final level.

        spacing: a discrete one ("leading", "trailing", "linspace": σ at the integer timesteps above), a
        continuous one between sigma_min and sigma_max: "karras" (Karras et al. 2022, eq. 5, ρ = rho) or
        "exponential" (uniform in log σ), or one of FEW_STEP_SPACINGS (``_few_step_sigmas``).
        final="zero": the last entry is 0 (the sampler returns a clean sample).
        final="alpha0": the last entry is σ at ᾱ_0 (diffusers' DDIM with set_alpha_to_one=False lands there);
        the caller divides the result by sqrt(1 + σ²) to get the VP sample.  If the discrete timesteps already
        end at t = 0 there is nothing left to do, and the sequence has `steps` entries (diffusers takes a no-op
        step there).
        """
        spacing = spacing or self.config.timestep_spacing
        if final not in ("zero", "alpha0"):
            raise ValueError(f"sigmas_for(): final must be 'zero' or 'alpha0', got {final!r}")
        if spacing in CONTINUOUS_SPACINGS:
            if final == "alpha0":
                raise ValueError(f"final='alpha0' applies to discrete spacings only, not {spacing!r}")
            levels = self._continuous_sigmas(steps, spacing, rho)
        elif spacing in FEW_STEP_SPACINGS:
            levels = self._few_step_sigmas(steps, spacing)
        else:
            levels = self.sigmas[self.timesteps(steps, spacing, convention=convention)]
        if final == "zero":
            return torch.cat([levels, levels.new_zeros(1)])
        if levels[-1] <= self.sigma_min:
            return levels
        return torch.cat([levels, levels.new_full((1,), self.sigma_min)])

    def _continuous_sigmas(self, steps: int, spacing: str, rho: float) -> Tensor:
        _check_steps(steps)
        lo, hi = self.sigma_min, self.sigma_max
        ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
        if spacing == "karras":
            # Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ
            return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        return torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))

    def _few_step_sigmas(self, steps: int, spacing: str) -> Tensor:
        """The community schedules, `steps` levels or fewer (beta merges repeated timesteps):
        lcm          LCMScheduler.set_timesteps: the distillation grid t = k·T/50 − 1 (k = 1..50), then `steps`
                     of its points at evenly spaced indices from the top (Luo et al. 2023, §4.3);
        simple       ComfyUI's: the σ table at T − 1 − ⌊i·T/steps⌋;
        sgm_uniform  t uniform from T − 1 to 0, steps + 1 points less the last, σ by log-σ interpolation (as
                     Stability's sgm discretisation; ComfyUI's "sgm_uniform");
        beta         t = round(F⁻¹(1 − i/steps)·(T − 1)) for the Beta(0.6, 0.6) distribution function F (Lee et
                     al. 2024), repeated timesteps merged;
        ays/ays_sdxl Align Your Steps' published levels (AYS_SIGMAS), interpolated log-linearly over the index
                     to steps + 1 levels, the last of which the final level replaces (as ComfyUI's node does)."""
        _check_steps(steps)
        T = self.num_timesteps
        if spacing == "lcm":
            if steps > LCM_ORIGINAL_STEPS:
                raise ValueError(f"the lcm spacing has at most {LCM_ORIGINAL_STEPS} steps (LCM's "
                                 f"original_inference_steps grid), got steps={steps}")
            grid = np.arange(1, LCM_ORIGINAL_STEPS + 1)[::-1] * (T // LCM_ORIGINAL_STEPS) - 1
            return self.sigmas[torch.from_numpy(grid[np.floor(np.linspace(0, LCM_ORIGINAL_STEPS, steps,
                                                                          endpoint=False)).astype(np.int64)])]
        if spacing == "simple":
            return self.sigmas[torch.tensor([T - 1 - int(i * (T / steps)) for i in range(steps)])]
        if spacing == "sgm_uniform":
            return self.t_to_sigma(torch.linspace(T - 1, 0, steps + 1, dtype=torch.float64)[:-1])
        if spacing == "beta":
            ts = [round(beta_quantile(1.0 - i / steps, BETA_ALPHA, BETA_BETA) * (T - 1)) for i in range(steps)]
            return self.sigmas[torch.tensor(sorted(set(ts), reverse=True))]
        table = torch.tensor(AYS_SIGMAS[spacing], dtype=torch.float64)
        if steps + 1 != len(table):
            where = torch.linspace(0, len(table) - 1, steps + 1, dtype=torch.float64)
            low = where.floor().long().clamp(max=len(table) - 2)
            w = where - low
            table = ((1 - w) * table[low].log() + w * table[low + 1].log()).exp()
        return table[:-1]

    def _per_sample(self, table: Tensor, t, like: Tensor) -> Tensor:
        """table[t] as a float64 tensor shaped to broadcast against `like` (t: int or (B,) integers)."""
        t = torch.as_tensor(t, device="cpu")
        if t.is_floating_point() and (t != t.round()).any():
            raise ValueError(f"q_sample/q_step take integer timesteps, got {t.tolist()}")
        t = t.long()
        if ((t < 0) | (t >= self.num_timesteps)).any():
            raise ValueError(f"timestep(s) {t.tolist()} outside [0, {self.num_timesteps - 1}]")
        values = table[t].to(like.device)
        return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))

    def q_sample(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """Closed form q(x_t | x_0) = N(sqrt(ᾱ_t)·x0, (1 − ᾱ_t)·I) (Ho et al. 2020, eq. 4), VP scale."""
        ab = self._per_sample(self.alphas_cumprod, t, x0)
        return (ab.sqrt() * x0.double() + (1.0 - ab).sqrt() * noise.double()).to(x0.dtype)

    def q_step(self, x_prev: Tensor, t, noise: Tensor) -> Tensor:
        """One Markov step q(x_t | x_{t−1}) = N(sqrt(1 − β_t)·x_{t−1}, β_t·I) (Ho et al. 2020, eq. 2)."""
        beta = self._per_sample(self.betas, t, x_prev)
        return ((1.0 - beta).sqrt() * x_prev.double() + beta.sqrt() * noise.double()).to(x_prev.dtype)


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), the Beta(a, b) distribution function.

    Its continued fraction (Abramowitz & Stegun 26.5.8), evaluated by the modified Lentz method, converges fast
    for x < (a + 1)/(a + b + 2); above that the symmetry I_x(a, b) = 1 − I_{1−x}(b, a) is used.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - beta_cdf(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (math.lgamma(a) + math.lgamma(b)
                                                                       - math.lgamma(a + b))
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 500):
        # the even term d_2m = m(b − m)x / ((a + 2m − 1)(a + 2m)), then the odd d_2m+1 = −(a + m)(a + b + m)x /
        # ((a + 2m)(a + 2m + 1))
        for coefficient in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + coefficient * d)
            c = guard(1.0 + coefficient / c)
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction


def beta_quantile(p: float, a: float, b: float) -> float:
    """F⁻¹(p) for the Beta(a, b) distribution (scipy.stats.beta.ppf), by bisection on ``beta_cdf`` to 2⁻⁶⁰."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"beta_quantile: p must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return p
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < p else (lo, mid)
    return 0.5 * (lo + hi)


def spacing_for_family(spacing: str | None, family: str | None) -> str | None:
    """The spacing a model family uses for `spacing` (Align Your Steps has one table per family)."""
    return FAMILY_SPACINGS.get((spacing, family), spacing)


def _check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
