"""Generation metadata stored inside PNG files, and read back.

Every image ldm saves carries two text chunks:

* ``parameters`` — the AUTOMATIC1111 web-UI "infotext" that most SD tools (A1111, ComfyUI importers, Civitai)
  read: the prompt, a ``Negative prompt:`` line, then one line of ``Key: value`` pairs;
* ``ldm`` — the same facts as JSON, complete enough that ``ldm generate --from-png FILE`` makes the same image.

Reading prefers the JSON chunk and falls back to parsing the infotext, so images made by other tools can be
reproduced as far as their settings map onto ldm's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ldm.checkpoints.library.hashes import lora_hash, weights_hash  # noqa: F401 - re-exported
from ldm.files import atomic_path

PARAMETERS_KEY = "parameters"
JSON_KEY = "ldm"

# ldm sampler name -> the name the A1111 web UI prints (its "Sampler:" field).
A1111_SAMPLERS = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2s_a": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "unipc": "UniPC",
    "lcm": "LCM",
    "tcd": "TCD",
}
# ldm spacing -> A1111 "Schedule type:" (older versions appended it to the sampler name: "DPM++ 2M Karras").
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform", "simple": "Simple",
                   "beta": "Beta", "ays": "Align Your Steps"}
# ... and as written: "Align Your Steps" names both tables (read back, "ays" resolves to the model's own).
SCHEDULE_LABELS = {**A1111_SCHEDULES, "ays_sdxl": "Align Your Steps"}


@dataclass
class GenerationInfo:
    """The settings that made one image (one seed)."""

    prompt: str
    seed: int
    steps: int
    sampler: str
    guidance: float
    width: int
    height: int
    negative_prompt: str = ""
    spacing: str | None = None  # None: the model's own timestep spacing
    eta: float = 0.0
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    model: str | None = None  # the model's name (file stem or folder name, never a path), informative only
    model_hash: str | None = None  # weights_hash() of the model
    vae: str | None = None  # a VAE swapped in (Pipeline.load_vae): its file or folder name, as A1111's "VAE"
    vae_hash: str | None = None  # weights_hash() of that VAE (A1111's "VAE hash")
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # mode-specific facts (strength, ...) and foreign keys

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("prompt", "seed", "steps", "sampler", "guidance", "width", "height") if k not in d]
        if missing:
            raise ValueError(f"generation metadata lacks {', '.join(missing)}")
        extra = dict(d.get("extra") or {})
        extra.update({k: v for k, v in d.items() if k not in known})
        kwargs = {k: v for k, v in d.items() if k in known and k != "extra"}
        return cls(**kwargs, extra=extra)

    def to_parameters(self) -> str:
        """The A1111 infotext: prompt, ``Negative prompt:`` line, then ``Key: value, ...``."""
        sampler = A1111_SAMPLERS.get(self.sampler, self.sampler)
        pairs: list[tuple[str, Any]] = [("Steps", self.steps), ("Sampler", sampler)]
        if self.spacing in SCHEDULE_LABELS:
            pairs.append(("Schedule type", SCHEDULE_LABELS[self.spacing]))
        pairs += [("CFG scale", _number(self.guidance)), ("Seed", self.seed), ("Size", f"{self.width}x{self.height}")]
        if self.model_hash:
            pairs.append(("Model hash", self.model_hash))
        if self.model:
            pairs.append(("Model", Path(self.model).name or self.model))  # a name; never a folder path
        if self.vae_hash:
            pairs.append(("VAE hash", self.vae_hash))
        if self.vae:
            pairs.append(("VAE", Path(self.vae).name or self.vae))
        if self.clip_skip:
            pairs.append(("Clip skip", self.clip_skip))
        if self.eta:
            pairs.append(("Eta", _number(self.eta)))
        if self.guidance_rescale:
            pairs.append(("CFG Rescale", _number(self.guidance_rescale)))
        if self.extra.get("strength") is not None:
            pairs.append(("Denoising strength", _number(self.extra["strength"])))
        if self.extra.get("Lora hashes"):
            pairs.append(("Lora hashes", self.extra["Lora hashes"]))
        pairs += [(k, v) for k, v in self.extra.items() if k.startswith("ControlNet ")]   # ldm.pipeline.control
        text = self.prompt
        if self.negative_prompt:
            text += f"\nNegative prompt: {self.negative_prompt}"
        return text + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in pairs)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _quote(value: Any) -> str:
    """A1111 quotes a value with JSON string syntax when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n\"") else text


# One `Key: value` pair of the infotext's last line; a value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*([A-Za-z][\w \-/+.()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse an A1111 infotext into {"prompt", "negative_prompt", and every ``Key: value`` as a string}."""
    lines = text.strip().split("\n")
    pairs = _PAIR.findall(lines[-1]) if lines else []
    result: dict[str, Any] = {}
    if len(pairs) >= 3:  # the settings line (a prompt rarely holds three "word: value," pairs)
        lines = lines[:-1]
        for key, value in pairs:
            result[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result["prompt"] = "\n".join(prompt).strip()
    result["negative_prompt"] = "\n".join(negative).strip()
    return result


def info_from_parameters(text: str) -> GenerationInfo:
    """Map an A1111 infotext onto ldm's settings (what has no ldm meaning stays in ``extra``)."""
    p = parse_parameters(text)
    try:
        width, height = (int(v) for v in p.pop("Size").split("x"))
        sampler_text = p.pop("Sampler")
        spacing = {v: k for k, v in A1111_SCHEDULES.items()}.get(p.pop("Schedule type", ""))
        for schedule, name in A1111_SCHEDULES.items():  # old style: "DPM++ 2M Karras"
            if sampler_text.endswith(" " + name):
                sampler_text, spacing = sampler_text[: -len(name) - 1], schedule
        sampler = {v: k for k, v in A1111_SAMPLERS.items()}.get(sampler_text, sampler_text.lower())
        info = GenerationInfo(
            prompt=p.pop("prompt"), negative_prompt=p.pop("negative_prompt"),
            seed=int(p.pop("Seed")), steps=int(p.pop("Steps")), guidance=float(p.pop("CFG scale")),
            sampler=sampler, spacing=spacing, width=width, height=height,
            eta=float(p.pop("Eta", 0.0)), guidance_rescale=float(p.pop("CFG Rescale", 0.0)),
            clip_skip=int(p.pop("Clip skip")) if "Clip skip" in p else None,
            model_hash=p.pop("Model hash", None), model=p.pop("Model", None),
            vae_hash=p.pop("VAE hash", None), vae=p.pop("VAE", None),
        )
    except KeyError as e:
        raise ValueError(f"infotext lacks the {e.args[0]!r} field") from None
    except ValueError as e:
        raise ValueError(f"infotext has a malformed value ({e})") from None
    if "Denoising strength" in p:
        info.extra["strength"] = float(p.pop("Denoising strength"))
    info.extra.update(p)
    return info


def attach(image: Image.Image, info: GenerationInfo) -> Image.Image:
    """Record ``info`` on the image (``image.info``) so that ``save_png`` writes it; returns the image."""
    image.info[PARAMETERS_KEY] = info.to_parameters()
    image.info[JSON_KEY] = info.to_json()
    return image


def save_png(image: Image.Image, path: str | os.PathLike, info: GenerationInfo | None = None) -> Path:
    """Write a PNG with both metadata chunks (from ``info``, else from ``image.info``), atomically.

    The bytes go to a temporary file in the destination folder that is then renamed (``ldm.files``), so a killed
    process never leaves a half-written image under the final name, and the file gets the umask's usual mode.
    """
    path = Path(path)
    if info is not None:
        attach(image, info)
    chunks = PngImagePlugin.PngInfo()
    for key in (PARAMETERS_KEY, JSON_KEY):
        if key in image.info:
            chunks.add_text(key, image.info[key])
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=chunks)
    return path


def read_png_info(path: str | os.PathLike) -> GenerationInfo:
    """The generation settings stored in an image: the ``ldm`` JSON chunk, else the A1111 infotext."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            text = dict(im.info)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
    try:
        if JSON_KEY in text:
            return GenerationInfo.from_dict(json.loads(text[JSON_KEY]))
        if PARAMETERS_KEY in text:
            return info_from_parameters(text[PARAMETERS_KEY])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: unreadable generation metadata: {e}") from None
    raise ValueError(f"{path}: no generation metadata (neither an 'ldm' nor a 'parameters' text chunk)")
