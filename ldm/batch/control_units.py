"""Control units as text and data: what ``ldm generate --control``, prompt-file lines, ``--from-png`` and the
server's A1111 API say about a unit, turned into :class:`~ldm.pipeline.control.Control` objects (here beside the
prompt files, the other text that describes requests; ``cli`` and ``serve`` use it).

    MODEL:IMAGE[:WEIGHT[:START[:END]]][:KEY=VALUE ...]      e.g. canny.safetensors:photo.jpg:0.8:module=canny

MODEL is a file or folder (or a name in a ``--control-dir``: its stem, or A1111's "name [hash]" title); KEY is one
of ``module``, ``mode``, ``resize_mode``, ``processor_res``, ``threshold_a``, ``threshold_b`` (Control's fields,
A1111's names). A PNG's ``ControlNet i`` entries (sd-webui-controlnet's infotext) read back into the same specs,
less the image, which A1111 does not record either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# what a unit spec may set beyond model, image, weight, start and end
OPTION_KEYS = ("module", "mode", "resize_mode", "processor_res", "threshold_a", "threshold_b")
NUMBERS = ("weight", "start", "end", "processor_res", "threshold_a", "threshold_b")
CONTROL_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin", ".pt")
_TITLE = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{6,64})\]$")   # A1111's "name [hash]"


@dataclass(frozen=True)
class UnitSpec:
    """One unit as text describes it (paths and names, not loaded models)."""

    model: str
    image: str | None = None      # a path; None: given separately (--from-png, the server's stored inputs)
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    module: str = "none"
    mode: str = "balanced"
    resize_mode: str = "Just Resize"
    processor_res: int | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def control(self, unit, image=None):
        """The Control of this spec for a loaded ``unit``, with ``image`` (default: the spec's own)."""
        from ldm.pipeline.control import Control

        return Control(unit, self.image if image is None else image, self.weight, self.start, self.end,
                       mode=self.mode, module=self.module, resize_mode=self.resize_mode,
                       processor_res=self.processor_res, threshold_a=self.threshold_a, threshold_b=self.threshold_b)


def _split(text: str) -> list[str]:
    """Split on ':' but keep a Windows drive ("C:\\x", "C:/x") together with its path."""
    parts, out = text.split(":"), []
    for part in parts:
        if out and len(out[-1]) == 1 and out[-1].isalpha() and part[:1] in ("\\", "/"):
            out[-1] += ":" + part
        else:
            out.append(part)
    return out


def _number(key: str, value: Any, where: str) -> float | int | None:
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    if key == "processor_res":
        if number != int(number):
            raise ValueError(f"{where}: processor_res must be an integer, got {value!r}")
        return int(number)
    return number


def unit_from_dict(record: dict[str, Any], where: str = "control") -> UnitSpec:
    """A unit from a JSON object (a prompt-file line's ``control``): ``{"model": ..., "image": ..., "weight":
    0.8, "module": "canny", ...}``; unknown keys are an error naming them."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a string MODEL:IMAGE[:WEIGHT...] or an object, got {record!r}")
    known = [f.name for f in dataclasses.fields(UnitSpec)]
    unknown = sorted(set(record) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; keys are {', '.join(known)}")
    for key in ("model", "image"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise ValueError(f"{where}: {key} must be a non-empty string (a path), got {record.get(key)!r}")
    values = {k: _number(k, v, where) if k in NUMBERS else v for k, v in record.items() if v is not None}
    return _checked(UnitSpec(**values), where)


def parse_unit(text: str, where: str = "--control") -> UnitSpec:
    """``MODEL:IMAGE[:WEIGHT[:START[:END]]][:KEY=VALUE ...]`` (see the module docstring)."""
    if not isinstance(text, str):
        return unit_from_dict(text, where)
    parts = _split(text.strip())
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{where}: expected MODEL:IMAGE[:WEIGHT[:START[:END]]][:KEY=VALUE...], got {text!r}")
    record: dict[str, Any] = {"model": parts[0], "image": parts[1]}
    positional = ("weight", "start", "end")
    for i, part in enumerate(parts[2:]):
        key, eq, value = part.partition("=")
        if eq:
            if key not in OPTION_KEYS:
                raise ValueError(f"{where}: unknown key {key!r} in {text!r}; keys are {', '.join(OPTION_KEYS)}")
            record[key] = value
        elif i < len(positional) and not any("=" in p for p in parts[2:2 + i]):
            record[positional[i]] = part
        else:
            raise ValueError(f"{where}: weight, start and end come before KEY=VALUE options, got {text!r}")
    return unit_from_dict(record, where)


def _checked(spec: UnitSpec, where: str) -> UnitSpec:
    """The checks a Control makes that need no loaded model (so a bad line fails before any model loads)."""
    from ldm.pipeline.control import MODES
    from ldm.pipeline.preprocess import get_module, resize_mode

    if not 0.0 <= spec.start <= spec.end <= 1.0:
        raise ValueError(f"{where}: start and end must satisfy 0 <= start <= end <= 1, got {spec.start}, {spec.end}")
    if spec.mode not in MODES:
        raise ValueError(f"{where}: mode must be balanced, prompt or control, got {spec.mode!r}")
    try:
        if not spec.module.lower().startswith(("ip-adapter", "clip_vision")):
            get_module(spec.module)
        resize_mode(spec.resize_mode)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if spec.processor_res is not None and not 64 <= spec.processor_res <= 4096:
        raise ValueError(f"{where}: processor_res must be in [64, 4096], got {spec.processor_res}")
    return spec


def units_from_value(value: Any, where: str = "control") -> list[UnitSpec]:
    """A prompt-file line's ``control``: one spec string or object, or a list of them."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{where}: an empty list (leave the key out for no control)")
    return [parse_unit(item, f"{where}[{i}]" if isinstance(value, list) else where) for i, item in enumerate(items)]


# ---------------------------------------------------------------------- PNG metadata
_INFO_FIELDS = {"Module": "module", "Model": "model", "Weight": "weight", "Guidance Start": "start",
                "Guidance End": "end", "Resize Mode": "resize_mode", "Processor Res": "processor_res",
                "Threshold A": "threshold_a", "Threshold B": "threshold_b", "Control Mode": "mode"}


def units_from_info(extra: dict[str, Any]) -> list[UnitSpec]:
    """The ``ControlNet i`` entries of a PNG's settings (sd-webui-controlnet's "Key: value, ..." text) as specs
    without images, in unit order."""
    from ldm.pipeline.control import MODES

    found = sorted((int(k.split()[1]), v) for k, v in extra.items()
                   if re.fullmatch(r"ControlNet \d+", k) and isinstance(v, str))
    specs = []
    for i, text in found:
        fields = dict(item.strip().split(": ", 1) for item in text.split(",") if ": " in item)
        record = {_INFO_FIELDS[k]: v for k, v in fields.items() if k in _INFO_FIELDS}
        if record.get("processor_res") in ("-1", "Auto"):
            record.pop("processor_res")
        if "mode" in record:
            record["mode"] = MODES.get(record["mode"], record["mode"])
        record["model"] = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", record.get("model", ""))
        record["image"] = "?"   # given separately
        spec = unit_from_dict(record, f"ControlNet {i}")
        if spec.module == "ip-adapter":
            spec = dataclasses.replace(spec, module="none")
        specs.append(dataclasses.replace(spec, image=None))
    return specs


# ---------------------------------------------------------------------- a folder of control files
def a1111_hash(path: str | Path) -> str:
    """AUTOMATIC1111's short model hash (``sd_models.model_hash``), which sd-webui-controlnet lists its models
    by: the first 8 hex digits of the sha256 of 64 KiB read at 1 MiB into the file."""
    path = Path(path)
    if path.is_dir():
        path = next((p for p in sorted(path.iterdir()) if p.suffix in CONTROL_SUFFIXES), path / "config.json")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        digest.update(f.read(0x10000))
    return digest.hexdigest()[:8]


class ControlFiles:
    """The control models of a folder (``--control-dir``): files with a weight suffix and diffusers folders
    (a ``config.json`` beside the weights), named by stem, titled "stem [hash]" as sd-webui-controlnet lists them."""

    def __init__(self, folder: str | Path | None, allow_paths: bool = True):
        self.folder, self.allow_paths = (Path(folder) if folder is not None else None), allow_paths
        if self.folder is not None and not self.folder.is_dir():
            raise ValueError(f"control folder {str(self.folder)!r} does not exist or is not a folder")
        self._hashes: dict[Path, str] = {}

    def paths(self) -> list[Path]:
        """The folder's control models, then the ones ldm ships (``default-canny``) where present."""
        from ldm.checkpoints.library.names import BUILT_IN, built_in

        found = [] if self.folder is None else [
            p for p in self.folder.iterdir() if (p.is_file() and p.suffix.lower() in CONTROL_SUFFIXES)
            or (p.is_dir() and (p / "config.json").is_file())]
        shipped = [built_in(kind, name) for kind, name in BUILT_IN if kind == "controlnet"]
        return sorted(found, key=lambda p: p.name.lower()) + [p for p in shipped if p is not None and p.exists()]

    def title(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = a1111_hash(path)
        return f"{path.stem if path.is_file() else path.name} [{self._hashes[path]}]"

    def titles(self) -> list[str]:
        return [self.title(p) for p in self.paths()]

    def find(self, name: str) -> Path | None:
        """A path that exists (unless ``allow_paths`` is off: a server names only what it lists), else a model by
        its stem or file name (any case), its title "stem [hash]", or its hash; None when nothing matches."""
        text = name.strip()
        match = _TITLE.match(text)
        stem, digest = (match.group(1), match.group(2).lower()) if match else (text, None)
        path = Path(text).expanduser()
        if self.allow_paths and path.exists():
            return path
        for path in self.paths():
            if stem.lower() in (path.stem.lower(), path.name.lower()):
                return path
        if digest is not None:
            found = [p for p in self.paths() if self.title(p).endswith(f"[{digest}]")]
            if found:
                return found[0]
        return None

    def resolve(self, name: str, where: str = "model", library=None) -> Path:
        """``find``, else a name of the models library (``--models-dir``); a ValueError naming ``where``, the
        name and what there is, when nothing answers to it."""
        path = self.find(name)
        if path is None and library is not None:
            from ldm.checkpoints.library import resolve_file

            try:
                path = resolve_file("controlnet", name, library)
            except ValueError:
                path = None
        if path is None or not path.exists():
            if self.allow_paths and (Path(name).suffix.lower() in CONTROL_SUFFIXES or "/" in name or "\\" in name):
                raise ValueError(f"{where}: {name} does not exist")
            known = ", ".join(p.stem if p.is_file() else p.name for p in self.paths()) or "none"
            place = f" in {self.folder}" if self.folder is not None else \
                " (give a path, or --control-dir DIR)" if self.allow_paths else " (start the server with --control-dir)"
            raise ValueError(f"{where}: no control model {name!r}{place}; available: {known}")
        return path


class UnitLoader:
    """Loads each control model once for a pipeline and makes ``Control``s from specs (the CLI, batch and the
    server's workers share it). ``ip_encoder``: an IP-Adapter's CLIP image encoder folder."""

    def __init__(self, pipe, files: ControlFiles | None = None, ip_encoder: str | None = None):
        self.pipe, self.files, self.ip_encoder = pipe, files or ControlFiles(None), ip_encoder
        self._loaded: dict[Path, Any] = {}

    def load(self, name: str | Path, where: str = "model"):
        from ldm.pipeline.control import NeedsImageEncoder

        path = self.files.resolve(str(name), where, getattr(self.pipe, "library", None)).resolve()
        if path not in self._loaded:
            try:
                self._loaded[path] = self.pipe.load_control(path)
            except NeedsImageEncoder:
                if not self.ip_encoder:
                    raise ValueError(f"{where}: {path.name} is an IP-Adapter, which needs its CLIP image encoder "
                                     "(--ip-encoder DIR)") from None
                self._loaded[path] = self.pipe.load_control(path, image_encoder=self.ip_encoder)
        return self._loaded[path]

    def controls(self, specs: list[UnitSpec], images: list | None = None, where: str = "control") -> list:
        """One Control per spec; ``images`` (one per spec) replace the specs' own."""
        out = []
        for i, spec in enumerate(specs):
            image = images[i] if images is not None else spec.image
            if image is None:
                raise ValueError(f"{where}[{i}]: no control image (model {spec.model})")
            out.append(spec.control(self.load(spec.model, f"{where}[{i}] model"), image))
        return out


_loaders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # pipeline -> its UnitLoader
_lock = threading.Lock()


def loader_for(pipe) -> UnitLoader:
    """One UnitLoader per pipeline (paths, ``--models-dir`` names and ldm's own), shared by the batch run and the
    server's workers: each control file is loaded once for it."""
    with _lock:
        if pipe not in _loaders:
            _loaders[pipe] = UnitLoader(pipe)
        return _loaders[pipe]


def line_controls(pipe, units: tuple[str, ...]) -> list:
    """A prompt-file line's units (canonical JSON, ``ldm.batch.prompt_file``) as Controls for ``pipe``, checked
    against its U-Net."""
    from ldm.pipeline.control import check_units

    controls = loader_for(pipe).controls([UnitSpec(**json.loads(u)) for u in units])
    check_units(pipe, controls)
    return controls
