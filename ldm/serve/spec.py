"""What one job generates (``JobSpec``), the server's limits, and the checks both APIs share.

A job is stored as the JSON of its ``JobSpec`` the moment it is accepted, with every choice already made (a
random seed drawn, the model's defaults filled in), so that a restarted server redraws exactly the same images.
Checks raise :class:`FieldError` naming the request field that is wrong (the field's name in the API the client
spoke: ``cfg_scale`` for A1111, ``guidance`` for ldm's own jobs); the app answers 422 with it.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from ldm.batch.prompt_file import parse_prompts

MODES = ("txt2img", "img2img", "inpaint")
MAX_IMAGES = 64  # images per request: a bound on what one client can put in front of everyone else
JOB_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "width", "height")  # + num
# ldm's argument names in the Pipeline's error messages -> the field a job request calls them
_PIPELINE_NAMES = {"num_images_per_prompt": "num", "height": "height", "width": "width", "steps": "steps",
                   "guidance": "guidance", "sampler": "sampler", "eta": "eta", "seed": "seed", "prompt": "prompt"}


class FieldError(ValueError):
    """A request value that cannot be served; ``field`` is its name in the request."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``--max-size``, ``--max-steps``); the queue bound lives in the queue."""

    max_size: int = 1024
    max_steps: int = 150


@dataclass
class JobSpec:
    """Everything the worker needs to draw a job's images, in ldm's terms; seeds are seed, seed+1, ..."""

    prompt: str
    seed: int
    steps: int | None     # None (before check): the model's default
    guidance: float | None
    sampler: str
    width: int | None
    height: int | None
    negative_prompt: str = ""
    spacing: str | None = None
    eta: float = 0.0
    batch_size: int = 1   # images per forward pass
    n_iter: int = 1       # passes, one after another (A1111's n_iter); images = batch_size * n_iter
    mode: str = "txt2img"
    strength: float | None = None  # img2img / inpaint denoising strength
    api: str = "ldm"      # "ldm" or "a1111": which API the client spoke (decides the response shape)
    model: str | None = None   # the library checkpoint drawn with (None: the server's startup model); as asked
                               # for until Server.checked resolves it
    names: dict[str, str] = field(default_factory=dict)  # ldm option -> the request's field name
    control: list = field(default_factory=list)   # ControlNet units: UnitSpec dicts (ldm.serve.controlnet)

    @property
    def count(self) -> int:
        return self.batch_size * self.n_iter

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls(**json.loads(text))

    def field_name(self, option: str) -> str:
        return self.names.get(option, option)


def random_seed() -> int:
    """A1111's seed -1: a fresh seed, drawn once at submission so that a restart redraws the same image."""
    return random.SystemRandom().randrange(2**32)


def check(spec: JobSpec, limits: Limits, pipe) -> JobSpec:
    """Apply the server's limits, then the model's own checks (``pipe.request``: size multiple, sampler, eta...),
    filling the model's defaults; returns the spec with every value resolved."""
    for option in ("width", "height"):
        if (getattr(spec, option) or 0) > limits.max_size:
            raise FieldError(spec.field_name(option), f"{spec.field_name(option)} {getattr(spec, option)} is over "
                                                      f"this server's --max-size {limits.max_size}")
    if spec.steps is not None and spec.steps > limits.max_steps:
        raise FieldError(spec.field_name("steps"), f"{spec.field_name('steps')} {spec.steps} is over this server's "
                                                   f"--max-steps {limits.max_steps}")
    if spec.count > MAX_IMAGES:
        name = spec.field_name("batch_size")
        raise FieldError(name, f"{name}: {spec.count} images in one request; at most {MAX_IMAGES}")
    try:
        req = pipe.request(spec.prompt, spec.negative_prompt, spec.steps, spec.guidance, spec.sampler,
                           spec.height, spec.width, spec.seed, spec.count, spec.eta, spacing=spec.spacing)
    except ValueError as e:
        raise FieldError(_named(str(e), spec), _renamed(str(e), spec)) from None
    return dataclasses.replace(spec, steps=req.steps, guidance=req.guidance, width=req.width, height=req.height)


def _named(message: str, spec: JobSpec) -> str:
    """The request field a Pipeline error message is about (its first ldm argument name)."""
    for word in re.findall(r"[a-z_]+", message):
        if word in _PIPELINE_NAMES:
            return spec.field_name(_PIPELINE_NAMES[word])
    return "body"


def _renamed(message: str, spec: JobSpec) -> str:
    name = _named(message, spec)
    return message if name in message else f"{name}: {message}"


def spec_from_job_request(body: Any, pipe) -> JobSpec:
    """``POST /ldm/v1/jobs``: a prompt-file JSONL line's keys plus ``num``, checked by batch's own line checker
    (the same rules and messages as ``ldm batch``)."""
    if not isinstance(body, dict):
        raise FieldError("body", f"the request body must be a JSON object, got {type(body).__name__}")
    record = dict(body)
    num, model = record.pop("num", 1), record.pop("model", None)   # model: a --models-dir name (Server.checked)
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise FieldError("num", f"num must be an integer >= 1, got {json.dumps(num)}")
    if "control" in record:   # a prompt-file key, but its files would be the server's: units come as images
        raise FieldError("control", "control: the job API takes no control units; send them to /sdapi/v1/txt2img "
                                    "(alwayson_scripts.controlnet)")
    parsed = parse_prompts((json.dumps(record) + "\n").encode("utf-8"), "request", "jsonl")
    if parsed.errors:
        message = parsed.errors[0].message
        raise FieldError(_first_key(message, record), message)
    options = parsed.lines[0].options
    return JobSpec(
        prompt=parsed.lines[0].prompt, negative_prompt=options.get("negative_prompt") or "",
        seed=options["seed"] if "seed" in options else random_seed(),
        steps=options.get("steps"), guidance=options.get("guidance"),
        sampler=options.get("sampler", pipe.defaults.get("sampler", "dpmpp_2m")),
        width=options.get("width"), height=options.get("height"), batch_size=num, names={"batch_size": "num"},
        model=model)


def _first_key(message: str, record: dict[str, Any]) -> str:
    """Which key a prompt-file checker message names: a quoted unknown key, else the first known key in it."""
    quoted = re.search(r"unknown keys? '([^']*)'", message)
    if quoted:
        return quoted.group(1)
    if "empty prompt" in message:
        return "prompt"
    for word in re.findall(r"[a-z_]+", message):
        if word in JOB_KEYS:
            return word
    return next(iter(record), "body")
