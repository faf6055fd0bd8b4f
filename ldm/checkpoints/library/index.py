"""The user's model library: the models folder of an A1111/Forge or ComfyUI install (or one laid out as ldm's),
indexed by kind, so that a model, LoRA, VAE, ControlNet or embedding is named instead of given by its path.

    library = Library("~/stable-diffusion-webui")        # --models-dir DIR / $LDM_MODELS_DIR
    library.find("checkpoint", "sd15").path                # by name, file name, A1111 title or short hash
    library.find("lora", "style")                          # models/Lora/style.safetensors (or .../sub/style)
    for e in library.entries: print(e.kind, e.family, e.size, e.name)

Where each kind is looked for, under DIR and under DIR/models (every folder of the list that exists is indexed):

    kind         A1111 / Forge                    ComfyUI (folder_paths.py)           ldm (documented in docs/models.md)
    checkpoint   models/Stable-diffusion          models/checkpoints                  checkpoints
    lora         models/Lora, models/LyCORIS      models/loras                        loras
    vae          models/VAE                       models/vae                          vae
    controlnet   models/ControlNet                models/controlnet, t2i_adapter      controlnet
    embedding    embeddings                       models/embeddings                   embeddings

An entry is a weight file (.safetensors, .ckpt, .pt, .pth, .bin) or a diffusers folder (a checkpoint folder
with model_index.json; a VAE or ControlNet folder with config.json), in its kind's folder or a subfolder of it.
Its **name** is its path in that folder without the suffix, "/"-separated ("sub/name"), as A1111 shows LoRAs
and embeddings; A1111's checkpoint "title" ("sub/name.safetensors [hash]") and "model_name" ("sub_name") find it
too, and so does its file's stem alone; a name that more than one entry of a kind answers to is ambiguous.

Listing reads headers and configs only (the family of a checkpoint from its tensor shapes, as ``ldm info`` does;
of a LoRA, ControlNet or embedding from its cross-attention / vector width); a file whose header is truncated or
unreadable is listed as broken with the reason, never failing the listing. Hashes are A1111's short ones
(``hashes``), computed only when asked for (a lookup by hash, ``ldm models --hash``) and cached on disk.
"""
from __future__ import annotations

import difflib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ldm.checkpoints.library.hashes import HashCache
from ldm.checkpoints.tensor_io import CheckpointError, read_json, read_safetensors_header

ENV = "LDM_MODELS_DIR"     # the models folder when no --models-dir / models_dir= is given
KINDS = ("checkpoint", "lora", "vae", "controlnet", "embedding")
FOLDERS = {"checkpoint": ("Stable-diffusion", "checkpoints"), "lora": ("Lora", "LyCORIS", "loras"),
           "vae": ("VAE", "vae"), "controlnet": ("ControlNet", "controlnet", "t2i_adapter"),
           "embedding": ("embeddings",)}
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
FOLDER_MARKERS = {"checkpoint": "model_index.json", "vae": "config.json", "controlnet": "config.json"}
# Cross-attention context width -> family: CLIP ViT-L (SD 1.x), OpenCLIP ViT-H (SD 2.x), ViT-L ‖ bigG (SDXL base),
# bigG alone (SDXL refiner); the vector width of an embedding file alike.
CONTEXT_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
_UP_FACTORS = ("lora_up", "lora_B", "hada_w1_a", "hada_w2_a", "lokr_w1")
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")     # the " [hash]" of an A1111 title
_HEX = re.compile(r"[0-9a-fA-F]{8,64}")


class LibraryError(CheckpointError):
    """A name the library cannot resolve (none, or more than one entry has it); the message lists candidates."""


@dataclass
class Entry:
    """One model file or folder of the library."""

    kind: str
    name: str                       # "sub/name": its path in its kind's folder, without the suffix
    path: Path
    size: int                       # bytes (a folder: its weight files)
    family: str = ""                # "sd1" | "sd2" | "sdxl" | "sdxl_refiner" | "" (not known cheaply)
    problem: str | None = None      # why it is listed as broken
    cache: HashCache = field(default=None, repr=False, compare=False)

    @property
    def file_name(self) -> str:
        """Its path in its kind's folder with the suffix ("sub/name.safetensors"), as A1111's titles start."""
        return self.name + (self.path.suffix if self.path.is_file() else "")

    @property
    def model_name(self) -> str:
        """A1111's checkpoint ``model_name``: the name with path separators made "_"."""
        return self.name.replace("/", "_")

    @property
    def hash_kind(self) -> str:
        return "lora" if self.kind == "lora" else "weights"

    @property
    def known_hash(self) -> str | None:
        """The short hash if it was computed before (listing never hashes)."""
        return None if self.problem else self.cache.known(self.path, self.hash_kind)

    def hash(self) -> str:
        """A1111's short hash (a checkpoint's "Model hash", 10 digits; a LoRA's addnet hash, 12), computed once."""
        return self.cache.get(self.path, self.hash_kind)

    @property
    def title(self) -> str:
        """A1111's checkpoint title: "sub/name.safetensors [hash]" (without the hash until it is known)."""
        digest = self.known_hash
        return f"{self.file_name} [{digest}]" if digest else self.file_name


# -- families, from headers and configs only ----------------------------------------------------------------------
def _context_family(shapes: dict) -> str:
    if any(k.startswith(("lora_te2_", "te2_", "text_encoder_2.", "conditioner.embedders.1")) for k in shapes):
        return "sdxl"
    for key, shape in shapes.items():
        if "attn2" in key and "to_k" in key and len(shape) == 2 and not any(u in key for u in _UP_FACTORS):
            return CONTEXT_FAMILIES.get(int(shape[-1]), "")
    return ""


def _embedding_family(shapes: dict) -> str:
    if "clip_g" in shapes:
        return "sdxl"
    widths = [shape[-1] for shape in shapes.values() if shape]
    return CONTEXT_FAMILIES.get(int(widths[0]), "") if len(widths) == 1 else ""


def _family(kind: str, path: Path) -> str:
    """The entry's family where headers or configs tell it; raises CheckpointError / OSError for a broken one."""
    if kind == "checkpoint":
        if path.is_dir() or path.suffix == ".safetensors":
            from ldm.checkpoints.loading import describe    # (loading imports the networks: only when listing)

            return describe(path).family
        return ""
    if path.is_dir():
        config = read_json(path / "config.json")
        return CONTEXT_FAMILIES.get(config.get("cross_attention_dim"), "") if kind == "controlnet" else ""
    if path.suffix != ".safetensors":
        with open(path, "rb") as f:         # a pickle is never unpickled to be listed; readable is all we check
            f.read(1)
        return ""
    shapes = read_safetensors_header(path).shapes
    if kind == "embedding":
        return _embedding_family(shapes)
    return "" if kind == "vae" else _context_family(shapes)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- the index --------------------------------------------------------------------------------------------------
class Library:
    """The entries of a models folder (see the module docstring); scanned on first use, again on ``refresh()``."""

    def __init__(self, root, cache: HashCache | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise LibraryError(f"models folder {self.root} does not exist (--models-dir / ${ENV})")
        self.cache = cache or HashCache()
        self._entries: dict[str, list[Entry]] = {}     # by kind, each scanned when first asked for
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Library({str(self.root)!r})"

    def folders(self, kind: str) -> list[Path]:
        """The existing folders of ``kind`` (each once, even where a file system ignores case)."""
        found: list[Path] = []
        for base in (self.root, self.root / "models"):
            for name in FOLDERS[kind]:
                folder = base / name
                if folder.is_dir() and not any(folder.samefile(f) for f in found):
                    found.append(folder)
        return found

    @property
    def entries(self) -> list[Entry]:
        """Every entry, kind by kind (``KINDS`` order)."""
        return [e for kind in KINDS for e in self.of(kind)]

    def refresh(self) -> Library:
        """Forget the index (the next use scans the folders again): files added or removed since are seen."""
        with self._lock:
            self._entries.clear()
        return self

    def of(self, kind: str) -> list[Entry]:
        """The entries of one kind (scanning only that kind's folders, the first time)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; the library holds {', '.join(KINDS)}")
        with self._lock:
            if kind not in self._entries:
                self._entries[kind] = [e for folder in self.folders(kind) for e in self._scan(kind, folder)]
            return list(self._entries[kind])

    def _scan(self, kind: str, folder: Path) -> list[Entry]:
        entries, marker = [], FOLDER_MARKERS.get(kind)
        pending = [folder]
        while pending:
            current = pending.pop()
            try:
                children = sorted(current.iterdir())
            except OSError:
                continue
            for child in children:
                if child.name.startswith("."):
                    continue
                if child.is_dir():
                    (entries.append(self._entry(kind, folder, child)) if marker and (child / marker).is_file()
                     else pending.append(child))
                elif child.suffix.lower() in SUFFIXES:
                    entries.append(self._entry(kind, folder, child))
        return sorted(entries, key=lambda e: e.name.lower())

    def _entry(self, kind: str, folder: Path, path: Path) -> Entry:
        relative = path.relative_to(folder)
        name = (relative.with_suffix("") if path.is_file() else relative).as_posix()
        entry = Entry(kind, name, path, 0, cache=self.cache)
        try:
            entry.size = _size(path)
            entry.family = _family(kind, path)
        except (CheckpointError, OSError, ValueError, KeyError) as exc:
            entry.problem = _one_line(exc)
        return entry

    # -- lookup --------------------------------------------------------------------------------------------------
    def lookup(self, kind: str, text: str) -> Entry | None:
        """The entry of ``kind`` that ``text`` names (see the module docstring), or None; LibraryError when more than
        one has that name. A hexadecimal ``text`` of 8+ digits is also tried as a short hash (hashing what must)."""
        entries, text = self.of(kind), str(text).strip()
        bare = _TITLE_HASH.sub("", text)
        found = [e for e in entries if bare in (e.name, e.file_name, e.model_name, e.path.stem, e.path.name)]
        if found:
            return self._one(kind, text, found)
        if _HEX.fullmatch(text):
            prefix = text.lower()
            found = [e for e in entries if not e.problem and (e.known_hash or "").startswith(prefix)]
            found = found or [e for e in entries if not e.problem and e.hash().startswith(prefix)]
            if found:
                return self._one(kind, text, found)
        return None

    def find(self, kind: str, text: str) -> Entry:
        """``lookup``, or a LibraryError naming the folders searched and the nearest names."""
        entry = self.lookup(kind, text)
        if entry is not None:
            return entry
        names = [e.name for e in self.of(kind)]
        by_stem = {e.path.stem: e.name for e in self.of(kind)}
        near = [by_stem.get(n, n) for n in difflib.get_close_matches(str(text), [*by_stem, *names], n=3, cutoff=0.5)]
        near = list(dict.fromkeys(near))
        where = ", ".join(str(f) for f in self.folders(kind)) or f"no {kind} folder under {self.root}"
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else (
            f"; it has {', '.join(map(repr, names[:8]))}" if names else "")
        raise LibraryError(f"no {kind} named {str(text)!r} in the models folder ({where}){hint}")

    @staticmethod
    def _one(kind: str, text: str, found: list[Entry]) -> Entry:
        if len(found) > 1:
            raise LibraryError(f"the {kind} name {text!r} is ambiguous: "
                               + "; ".join(str(e.path) for e in found) + " (name one by its path or sub/name)")
        return found[0]
