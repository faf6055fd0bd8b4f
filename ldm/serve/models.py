"""The models a server draws with: the one it started with, and the checkpoints of its models folder
(``--models-dir``, ``ldm.checkpoints.library``), loaded when a request first asks for one and kept while memory
allows, and how A1111's API lists them (``/sd-models``, ``/loras``, ``/sd-vae``, ``/embeddings``).

A job names its model in its spec (``JobSpec.model``: the library name, or None for the model the server
started with), chosen when it is accepted (``override_settings.sd_model_checkpoint``, else the model
``POST /options`` last chose), so a queued job keeps the model it asked for whatever is switched after it, and a
restarted server redraws it with that model. Loaded pipelines are held per (model, device) in least-recently-used
order; before another loads, the oldest are dropped until the new one's weights fit in the memory the device has
free (``ldm.pipeline.memory.available_bytes``) and at most ``MAX_LOADED`` library models stay loaded.
"""
from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints.embeddings import read_embedding
from ldm.checkpoints.library import Library, LibraryError
from ldm.pipeline import load_pipeline
from ldm.pipeline.memory import MARGIN, available_bytes
from ldm.serve.spec import FieldError

MAX_LOADED = 3          # library models held at once beside the one the server started with
DEFAULT_NAME = "ldm-default"
FIELD = "sd_model_checkpoint"


class ModelPool:
    """Pipelines by model name and device; thread-safe (workers and request threads share it)."""

    def __init__(self, settings, pipes: list, library: Library | None):
        self.settings, self.library = settings, library
        self.startup = pipes                 # one per device, never dropped
        self.current: str | None = None      # the model new requests get: a library name, None = the startup one
        self._loaded: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.RLock()

    # -- names ------------------------------------------------------------------------------------------------
    def name_for(self, wanted: Any, field: str = FIELD) -> str | None:
        """A requested model (a library name, title or hash; the startup model's title, name or hash) -> the
        library name (None: the startup model). FieldError naming ``field`` when nothing answers to it."""
        if not isinstance(wanted, str) or not wanted.strip():
            raise FieldError(field, f"{field} must be a model name, got {wanted!r}")
        card = self.card(None)
        if wanted in (card["title"], card["model_name"], card["hash"], card["filename"]):
            return None
        if self.library is None:
            raise FieldError(field, f"{field} {wanted!r}: this server serves only {card['title']!r} (start it with "
                                    "--models-dir DIR to switch between the models of a folder)")
        try:
            entry = self.library.find("checkpoint", wanted)
        except LibraryError as e:
            raise FieldError(field, f"{field}: {e}") from None
        if entry.problem:
            raise FieldError(field, f"{field} {wanted!r}: {entry.path} is broken ({entry.problem})")
        return entry.name

    # -- pipelines --------------------------------------------------------------------------------------------
    def get(self, name: str | None, home):
        """The pipeline of model ``name`` on ``home``'s device (``home``: that device's startup pipeline)."""
        if name is None:
            return home
        key = (name, str(home.device))
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            entry = self.library.find("checkpoint", name)
            self._make_room(entry.size, home.device)
            pipe = load_pipeline(entry.path, device=home.device, dtype=self.settings.dtype, models_dir=self.library)
            if self.settings.vae:
                pipe.load_vae(self.settings.vae)
            pipe.__dict__["model_hash"] = entry.hash()      # through the library's hash cache, computed once
            self._loaded[key] = pipe
            return pipe

    def switch(self, wanted: Any) -> str | None:
        """``POST /options {"sd_model_checkpoint": ...}``: load the model now (a missing or broken one is a
        FieldError and the current model stays), then make it the one new requests get."""
        name = self.name_for(wanted)
        try:
            self.get(name, self.startup[0])
        except (ValueError, OSError) as e:     # CheckpointError is a ValueError
            raise FieldError(FIELD, f"{FIELD} {wanted!r} cannot be loaded: {' '.join(str(e).split())}") from None
        self.current = name
        return name

    def _make_room(self, size: int, device: torch.device) -> None:
        """Drop least recently used models until ``size`` bytes of weights (read as float32: twice an fp16 file)
        fit in what ``device`` has free, and fewer than MAX_LOADED remain."""
        def short() -> bool:
            free = available_bytes(device)
            return free is not None and 2 * size > MARGIN * free

        while self._loaded and (len(self._loaded) >= MAX_LOADED or short()):
            self._loaded.popitem(last=False)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # -- what A1111's API lists -------------------------------------------------------------------------------
    def card(self, name: str | None) -> dict[str, Any]:
        """A model as ``/sdapi/v1/sd-models`` lists one: title (A1111: "file.safetensors [hash]"), model_name,
        short hash, file name."""
        if name is not None:
            entry = self.library.find("checkpoint", name)
            digest = entry.known_hash
            return {"title": entry.title, "model_name": entry.model_name, "hash": digest, "sha256": None,
                    "filename": str(entry.path), "config": None}
        pipe = self.startup[0]
        source = pipe.source
        label = Path(source).stem if source is not None and Path(source).name != "default" else DEFAULT_NAME
        digest = pipe.model_hash
        return {"title": f"{label} [{digest}]" if digest else label, "model_name": label, "hash": digest,
                "sha256": None, "filename": str(source) if source else None, "config": None}

    def cards(self) -> list[dict[str, Any]]:
        """The startup model (unless it is one of the library's), then the library's checkpoints."""
        entries = [e for e in self.library.of("checkpoint") if not e.problem] if self.library else []
        first = self.card(None)
        listed = [first] if not any(str(e.path) == first["filename"] for e in entries) else []
        return listed + [self.card(e.name) for e in entries]

    def loras(self) -> list[dict[str, Any]]:
        """``/sdapi/v1/loras``: A1111 lists a LoRA by its file's stem (what ``<lora:NAME:W>`` takes)."""
        entries = self.library.of("lora") if self.library else []
        return [{"name": e.path.stem, "alias": e.path.stem, "path": str(e.path), "metadata": {}}
                for e in entries if not e.problem]

    def vaes(self) -> list[dict[str, Any]]:
        """``/sdapi/v1/sd-vae``: the library's VAEs by file name, and the ``--vae`` swapped in."""
        listed = [{"model_name": e.file_name, "filename": str(e.path)}
                  for e in (self.library.of("vae") if self.library else []) if not e.problem]
        loaded = getattr(self.startup[0], "vae_file", None)
        if loaded is not None and not any(v["filename"] == str(loaded.path) for v in listed):
            listed.append({"model_name": loaded.name, "filename": str(loaded.path)})
        return listed

    def embeddings(self, name: str | None) -> dict[str, dict]:
        """``/sdapi/v1/embeddings``: the library's embeddings that model ``name`` loaded, and those it skipped
        (made for another family), with their vector count and width."""
        pipe = self.get(name, self.startup[0])
        vocab = pipe.text_encoder.tokenizer.get_vocab()
        out: dict[str, dict] = {"loaded": {}, "skipped": {}}
        for e in self.library.of("embedding") if self.library else []:
            try:
                vectors = next(iter(read_embedding(e.path, token=e.path.stem).values()))
            except (ValueError, OSError):
                continue
            entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                     "shape": int(vectors.shape[-1]), "vectors": int(vectors.shape[0])}
            out["loaded" if e.path.stem in vocab else "skipped"][e.path.stem] = entry
        return out

    def refresh(self) -> None:
        """A1111's ``refresh-checkpoints`` (and -loras, -vae, -embeddings): scan the models folder again."""
        if self.library is not None:
            self.library.refresh()
