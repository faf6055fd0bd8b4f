"""Samplers: pure functions over (denoiser, x, sigmas) in σ-space.

Every sampler integrates from x at sigmas[0] down to sigmas[-1] (usually 0), where x = x0 + σ·n and
denoiser(x, σ) estimates E[x0 | x].  Step i goes from sigmas[i] to sigmas[i + 1]; the next noise level is
always read from the list, never recomputed from integer timesteps.  The probability-flow ODE (Karras et al.
2022, eq. 4 with σ(t) = t) is dx/dσ = (x − D(x; σ))/σ; ancestral and SDE samplers add fresh noise each step,
drawn on the CPU through ldm.rng (generator: None, one Generator, or one per batch row).

callback(info) runs once per step with info = {i, sigma, sigma_next, x, denoised, steps}; x is the sample at
sigma (before the step) and denoised its x0 estimate.  Samplers keep no state between calls.

    base         the σ check, the run's book-keeping, the ancestral split, schedule hints
    classic      ddpm, ddim, euler, euler_a, heun, dpm_2, dpmpp_2m, dpmpp_2m_sde
    multistep    lms, unipc, dpmpp_3m_sde
    singlestep   dpmpp_2s_a, dpmpp_sde
    consistency  lcm, tcd (few-step samplers for consistency-distilled models)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

from torch import Tensor

from ldm.samplers.base import check_sigmas
from ldm.samplers.classic import ddim, ddpm, dpm_2, dpmpp_2m, dpmpp_2m_sde, euler, euler_a, heun
from ldm.samplers.consistency import lcm, tcd
from ldm.samplers.multistep import dpmpp_3m_sde, lms, unipc
from ldm.samplers.singlestep import dpmpp_2s_a, dpmpp_sde
from ldm.schedules import CONTINUOUS_SPACINGS, SPACINGS, NoiseSchedule, spacing_for_family

__all__ = ["SAMPLERS", "UnknownSamplerError", "check_eta", "check_sigmas", "get_sampler", "resolve_spacing",
           "sampler_sigmas", "schedule_hints_of"]
# Samplers whose eta has an upper bound: TCD's γ is a fraction of the way down to the next timestep.
ETA_RANGES = {"tcd": (0.0, 1.0)}


class UnknownSamplerError(KeyError, ValueError):
    """An unknown sampler name; the message lists the known ones."""

    def __str__(self):
        return str(self.args[0])


class _Registry(dict):
    def __missing__(self, name):
        raise UnknownSamplerError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(self))}")


SAMPLERS: dict[str, Callable[..., Tensor]] = _Registry(
    ddpm=ddpm, ddim=ddim, euler=euler, euler_a=euler_a, heun=heun, dpm_2=dpm_2, dpmpp_2m=dpmpp_2m,
    dpmpp_2m_sde=dpmpp_2m_sde, lms=lms, unipc=unipc, dpmpp_3m_sde=dpmpp_3m_sde, dpmpp_2s_a=dpmpp_2s_a,
    dpmpp_sde=dpmpp_sde, lcm=lcm, tcd=tcd,
)


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler called `name`; ValueError (also a KeyError) listing the known names if there is none."""
    return SAMPLERS[name]


def schedule_hints_of(name: str) -> dict:
    """How the sampler's reference scheduler runs where the caller says nothing: {"spacing": ..., "final":
    "alpha0", "convention": ..., "quantize": False}, each key only where it differs from the default (``base``)."""
    return dict(getattr(SAMPLERS[name], "schedule_hints", {}))


def check_eta(name: str, eta: float) -> None:
    """ValueError naming the value unless `eta` suits sampler `name`: 0 for every sampler (its default), else
    >= 0 for samplers that take one, within the sampler's range where it has one (ETA_RANGES)."""
    low, high = ETA_RANGES.get(name, (0.0, math.inf))
    takes = "eta" in inspect.signature(SAMPLERS[name]).parameters
    if eta < 0 or (eta and not (takes and low <= eta <= high)):
        within = f"in [{low:g}, {high:g}]" if high < math.inf else ">= 0"
        raise ValueError(f"eta={eta} is not valid for sampler {name!r} (eta {within}, for samplers that take it)")


def resolve_spacing(name: str, spacing: str | None, family: str | None = None) -> str | None:
    """The spacing a run of sampler `name` uses: `spacing` if given (ValueError listing the known ones if it is
    unknown), else the sampler's own (lcm/tcd: LCM's grid), else None (the model's); "ays" becomes the model
    family's Align Your Steps table (``ldm.schedules.spacing_for_family``)."""
    if spacing is not None and spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; known spacings: {', '.join(SPACINGS)}")
    return spacing_for_family(spacing or schedule_hints_of(name).get("spacing"), family)


def sampler_sigmas(schedule: NoiseSchedule, name: str, steps: int, spacing: str | None = None) -> Tensor:
    """The σ list sampler `name` runs on for `steps` steps of `spacing` (None: the schedule's own), laid out as
    its diffusers scheduler does. DDIM with set_alpha_to_one=False ends on σ at ᾱ_0 instead of 0, as
    DDIMScheduler does (its last step lands on alphas_cumprod[0]), and TCD always does (TCDScheduler's last
    step lands on its s = 0). With "leading" and "trailing" spacing this reproduces diffusers' DDIM; with
    "linspace" diffusers steps each t to t − T/steps rather than to the next listed timestep, which no single σ
    sequence expresses, and ldm keeps the consistent schedule. UniPC lays out "leading" and "linspace" over
    steps + 1 points, as DPM-Solver's schedulers do (``NoiseSchedule.timesteps``)."""
    spacing = spacing or schedule.config.timestep_spacing
    hints = schedule_hints_of(name)
    alpha0 = hints.get("final") == "alpha0" or (name == "ddim" and not schedule.config.set_alpha_to_one)
    return schedule.sigmas_for(steps, spacing, final="alpha0" if alpha0 and spacing not in CONTINUOUS_SPACINGS
                               else "zero", convention=hints.get("convention", "ddim"))
