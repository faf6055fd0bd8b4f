"""``ldm batch PROMPT_FILE --out DIR``: every line of a prompt file drawn, resumably, by one or many processes.

The run, in order:

1. read and check the whole prompt file (``ldm.prompt_file``): every bad line is reported as ``file:line: reason``
   before any model loads; ``--skip-invalid`` leaves bad lines out with a warning instead;
2. make the **plan**: one item per image (line, image index, prompt, seed, settings, file name), and the batches
   (compatible items, ``--batch-size`` at a time, fixed by the plan alone);
3. compare the plan with ``DIR/batch.json`` (a changed file or changed settings are refused unless --overwrite);
4. skip the finished images (a manifest record whose file exists with the recorded sha256), make the rest, and
   record each one in the manifest after its PNG is durably in place (``ldm.manifest``).

Seeds: a line's ``seed`` gives its images seed, seed+1, ...; otherwise the line's first seed is derived from
``--seed`` and the line number by SplitMix64 (Steele et al. 2014), so an image depends only on its line.

Batches are part of the plan and never re-packed: a resumed run re-runs a partly finished batch whole (writing
only its missing images), and process r of N takes batches j with j % N == r. Every image is thus computed
in the same company as in an uninterrupted single-process run — batched CPU/GPU kernels are not bit-identical
across batch sizes, so this is what makes "the same image" mean the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import sys
import unicodedata
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ldm.batch import manifest as mf
from ldm.batch.control_units import line_controls
from ldm.batch.prompt_file import PromptFile, long_prompts, read_prompt_file
from ldm.files import check_writable, remove_temporaries, write_atomic
from ldm.pipeline import load_pipeline
from ldm.pipeline.png_info import JSON_KEY, PARAMETERS_KEY
from ldm.pipeline.vae_swap import vae_metadata
from ldm.samplers import get_sampler

DEFAULT_BATCH_SIZE = 4
SLUG_LENGTH = 60
GRID = "grid.png"
GRID_CELL = 256  # the contact sheet's largest thumbnail side, in pixels
_MASK64 = (1 << 64) - 1


class BatchError(ValueError):
    """A prompt file, plan or output folder that cannot be run; the message names the file, line or folder."""


@dataclass
class BatchOptions:
    """What ``ldm batch`` was asked for (the CLI fills it from its flags; field names are the flags')."""

    prompt_file: str                 # .txt / .jsonl / .csv, or "-" for standard input
    out: str                         # folder for the PNGs, manifest.jsonl and batch.json
    format: str | None = None        # prompt file format (None: from the suffix)
    seed: int = 0                    # base seed of lines without their own
    num: int = 1                     # images per line
    negative: str = ""               # negative prompt of lines without their own
    steps: int | None = None
    guidance: float | None = None
    sampler: str = "dpmpp_2m"
    height: int | None = None
    width: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    skip_invalid: bool = False       # leave out bad lines with a warning instead of refusing the file
    overwrite: bool = False          # start the folder's batch over
    grid: bool = False               # also write DIR/grid.png
    quiet: bool = False              # no progress bar
    model: str | None = None         # None: the shipped default model
    device: str | None = None
    dtype: str | None = None
    vae_tiling: bool = False
    vae: str | None = None           # a VAE to swap in (Pipeline.load_vae)
    models_dir: str | None = None    # a models folder: names for model, vae, <lora:NAME> (None: $LDM_MODELS_DIR)


# ---------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Item:
    """One image of the plan."""

    line: int
    image: int  # 0 .. num-1 within its line
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    height: int
    width: int
    file: str
    control: tuple[str, ...] = ()   # the line's control units, canonical JSON (ldm.batch.prompt_file)

    @property
    def key(self) -> tuple[int, int]:
        return self.line, self.image

    @property
    def settings(self) -> tuple:
        """Items with equal settings can share a forward pass."""
        return self.steps, self.guidance, self.sampler, self.height, self.width, self.control


@dataclass
class Plan:
    items: list[Item]
    batches: list[list[int]]  # indices into items
    record: dict[str, Any]  # what batch.json stores: settings and one hash per line


def splitmix64(x: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014): a bijection on 64-bit ints that mixes all bits."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def line_seed(base: int, line: int) -> int:
    """The first seed of a line that names none: a 32-bit seed (as other SD tools print) from the base seed and
    the line number only."""
    return splitmix64(splitmix64(base) ^ line) >> 32


def slug(prompt: str, limit: int = SLUG_LENGTH) -> str:
    """A file-name-safe, bounded, stable rendering of a prompt: accents folded to ASCII, every other run of
    characters (``/``, ``..``, NUL, emoji, spaces) made one ``-``, lowercase, at most ``limit`` characters."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return text[:limit].rstrip("-") or "prompt"


def file_name(line: int, prompt: str, seed: int) -> str:
    return f"{line:05d}-{slug(prompt)}-{seed}.png"


def make_plan(prompts: PromptFile, options: BatchOptions, pipe) -> Plan:
    """Items for every valid line × ``--num`` with resolved settings (the model's defaults filled in by
    ``pipe.request``, which also checks them), and the fixed batches."""
    items: list[Item] = []
    resolved: dict[tuple, Any] = {}
    for entry in prompts.lines:
        o = entry.options
        wanted = (o.get("steps", options.steps), o.get("guidance", options.guidance), o.get("sampler", options.sampler),
                  o.get("height", options.height), o.get("width", options.width))
        if wanted not in resolved:
            try:
                resolved[wanted] = pipe.request("x", None, *wanted, seed=0)
            except ValueError as e:
                raise BatchError(f"{prompts.source}:{entry.line}: {e}") from None
        req = resolved[wanted]
        first = o["seed"] if "seed" in o else line_seed(options.seed, entry.line)
        if first + options.num > 2**64:
            raise BatchError(f"{prompts.source}:{entry.line}: seed {first} + {options.num} images passes 2**64")
        negative = o.get("negative_prompt", options.negative)
        control = o.get("control", ())
        if control:   # the models load (once) and are checked now: a bad unit stops the run before any image
            try:
                line_controls(pipe, control)
            except ValueError as e:
                raise BatchError(f"{prompts.source}:{entry.line}: {e}") from None
        for k in range(options.num):
            items.append(Item(entry.line, k, entry.prompt, negative, first + k, req.steps, req.guidance,
                              req.sampler, req.height, req.width, file_name(entry.line, entry.prompt, first + k),
                              control))
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.settings, []).append(i)
    batches = [g[s:s + options.batch_size] for g in groups.values() for s in range(0, len(g), options.batch_size)]
    batches.sort(key=lambda b: b[0])
    return Plan(items, batches, _plan_record(prompts, options, pipe, items))


def _plan_record(prompts: PromptFile, options: BatchOptions, pipe, items: list[Item]) -> dict[str, Any]:
    settings = {"num": options.num, "seed": options.seed, "negative": options.negative, "steps": options.steps,
                "guidance": options.guidance, "sampler": options.sampler, "height": options.height, "width": options.width,
                "model": pipe.model_hash or str(pipe.source), "dtype": str(pipe.dtype).removeprefix("torch.")}
    if options.vae:     # only then, so that folders made before --vae existed still resume
        settings["vae"] = vae_metadata(pipe).get("vae_hash") or options.vae
    by_line: dict[str, list[dict]] = {}
    for item in items:
        record = asdict(item)
        if not record["control"]:   # so that folders made before lines took control units still resume
            record.pop("control")
        by_line.setdefault(str(item.line), []).append(record)
    lines = {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in by_line.items()}
    return {"prompt_file": prompts.source, "settings": settings, "lines": lines, "images": len(items)}


# ---------------------------------------------------------------------- processes
@dataclass
class World:
    """This process's place among the ``torchrun`` / ``accelerate launch`` processes (one: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        return cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))

    def start(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")  # CPU tensors only: barriers and a few counts

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def total(self, counts: list[int]) -> list[int]:
        if self.size == 1:
            return counts
        import torch
        import torch.distributed as dist

        t = torch.tensor(counts, dtype=torch.int64)
        dist.all_reduce(t)
        return t.tolist()

    def stop(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# ---------------------------------------------------------------------- the command
def run_batch(options: BatchOptions) -> int:
    """Draw every image of ``options.prompt_file`` into ``options.out`` that is not there yet; returns the exit
    status (1 if some images failed with NaN/inf, else 0). Bad input raises ``BatchError`` before any model
    loads; a rerun of the same call resumes."""
    world = World.from_environment()
    if options.prompt_file == "-" and world.size > 1:
        raise BatchError("reading prompts from stdin needs a single process; save them to a file")
    get_sampler(options.sampler)  # a bad --sampler fails before the file is read
    stdin = sys.stdin.buffer if options.prompt_file == "-" else None
    prompts = read_prompt_file(options.prompt_file, options.format, stdin=stdin)
    _report(prompts, options.skip_invalid, world.rank == 0)
    if not prompts.lines:
        raise BatchError(f"{prompts.source}: no prompts to draw")
    out = check_writable(options.out)
    device = f"cuda:{world.local_rank}" if options.device == "cuda" and world.size > 1 else options.device
    pipe = load_pipeline(options.model, device=device, dtype=options.dtype,  # one GPU per process
                         emphasis=not getattr(options, "no_emphasis", False),
                         lora_dir=getattr(options, "lora_dir", None), lora_strict=getattr(options, "strict", True),
                         embeddings_dir=getattr(options, "embeddings_dir", None),
                         models_dir=options.models_dir)
    if options.vae:
        pipe.load_vae(options.vae)
    if options.vae_tiling:
        pipe.enable_vae_tiling()
    if world.rank == 0:     # a small model's text encoder may read fewer tokens than CLIP's 75
        for problem in long_prompts(prompts, pipe.text_encoder.tokenizer, pipe.text_encoder.max_length - 2):
            _warn(problem)
    plan = make_plan(prompts, options, pipe)
    previous = None if options.overwrite else _previous_plan(out)
    if previous is not None and _comparable(previous) != _comparable(plan.record):
        change = mf.describe_change(previous, plan.record)
        raise BatchError(f"{out} holds a batch made from a different plan ({change}); pass --overwrite to start "
                         "over, or choose another --out")
    world.start()
    try:
        if world.rank == 0:
            _prepare(out, plan, options.overwrite)
        world.barrier()
        made, skipped, failed = _generate(pipe, plan, out, world, options.quiet)
        world.barrier()
        made, skipped, failed = world.total([made, skipped, failed])
        if world.rank == 0:
            records = mf.merge(out, _record_key)
            if options.grid:
                _contact_sheet(out, [r["file"] for r in records])
            invalid = f", {len(prompts.errors)} invalid lines left out" if prompts.errors else ""
            print(f"ldm batch: {len(plan.items)} images: {made} made, {skipped} already done, {failed} failed"
                  f"{invalid}; {out / mf.MANIFEST}", file=sys.stderr)
    finally:
        world.stop()
    return 1 if failed else 0


def _warn(problem, kind: str = "") -> None:
    print(f"{problem.source}:{problem.line}: warning: {kind}{problem.message}", file=sys.stderr)


def _report(prompts: PromptFile, skip_invalid: bool, speak: bool) -> None:
    if speak:
        for problem in sorted(prompts.warnings + (prompts.errors if skip_invalid else []), key=lambda p: p.line):
            _warn(problem, "line left out: " if problem in prompts.errors else "")
        if not skip_invalid:
            for problem in prompts.errors:
                print(f"{problem}", file=sys.stderr)
    if prompts.errors and not skip_invalid:
        n = len(prompts.errors)
        raise BatchError(f"{n} invalid line{'s' if n > 1 else ''} in {prompts.source} (listed above); fix "
                         f"{'them' if n > 1 else 'it'} or pass --skip-invalid to leave {'them' if n > 1 else 'it'} out")


def _previous_plan(out: Path) -> dict | None:
    plan = mf.load_plan(out)
    if plan is None and mf.read_records(out / mf.MANIFEST):
        raise BatchError(f"{out} has a {mf.MANIFEST} but no {mf.PLAN}; pass --overwrite to start over")
    if plan is not None:
        plan.pop("version", None)
    return plan


def _comparable(plan: dict) -> tuple:
    """What must match for a folder to be resumed: the settings and every line's items (not the file's name)."""
    return plan.get("settings"), plan.get("lines")


def _record_key(record: dict) -> tuple[int, int]:
    return int(record["line"]), int(record["image"])


def _prepare(out: Path, plan: Plan, overwrite: bool) -> None:
    """Rank 0, before any image: clear what --overwrite discards, drop temporaries, merge leftover manifest
    parts of a killed multi-process run, and record the plan."""
    if overwrite:
        for record in mf.read_records(out / mf.MANIFEST) + [r for p in out.glob("manifest.rank*.jsonl")
                                                            for r in mf.read_records(p)]:
            name = str(record.get("file", ""))
            if name and Path(name).name == name:  # only plain names inside DIR, never a path
                (out / name).unlink(missing_ok=True)
        for name in (mf.MANIFEST, mf.PLAN, GRID):
            (out / name).unlink(missing_ok=True)
        for part in out.glob("manifest.rank*.jsonl"):
            part.unlink()
    remove_temporaries(out)
    mf.merge(out, _record_key)
    mf.save_plan(out, plan.record)


def _finished(out: Path, plan: Plan, wanted: set[int]) -> set[int]:
    """Indices (among ``wanted``) of items with a manifest record for the same file whose bytes still hash to
    the recorded sha256. A PNG without a record is not trusted: it is made again (and overwritten)."""
    by_key = {plan.items[i].key: i for i in wanted}
    done = set()
    for record in mf.read_records(out / mf.MANIFEST):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            i = by_key.get(_record_key(record))
            if i is not None and record["file"] == plan.items[i].file \
                    and _sha256(out / record["file"]) == record["sha256"]:
                done.add(i)
    return done


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _generate(pipe, plan: Plan, out: Path, world: World, quiet: bool) -> tuple[int, int, int]:
    """Make this rank's unfinished images; returns (made, skipped, failed)."""
    from tqdm.auto import tqdm

    mine = [b for j, b in enumerate(plan.batches) if j % world.size == world.rank]
    done = _finished(out, plan, {i for b in mine for i in b})
    todo = sum(i not in done for b in mine for i in b)
    made = failed = 0
    target = out / mf.MANIFEST if world.size == 1 else mf.part_path(out, world.rank)
    label = "images" if world.size == 1 else f"rank 0/{world.size}"
    with mf.ManifestWriter(target) as manifest, \
            tqdm(total=todo, desc=label, unit="img", disable=quiet or world.rank != 0 or todo == 0) as bar, \
            warnings.catch_warnings():
        # prompts past the text encoder's context were already warned about, with file:line
        warnings.filterwarnings("ignore", message=r"prompt \d+ is longer than the text encoder")
        for batch in mine:
            missing = [i for i in batch if i not in done]
            if not missing:
                continue
            items = [plan.items[i] for i in batch]
            first = items[0]
            try:
                # a line without a negative prompt is drawn as `ldm generate` without --negative draws it
                images = pipe([it.prompt for it in items], [it.negative_prompt or None for it in items], first.steps,
                              first.guidance, first.sampler, first.height, first.width,
                              seed=[it.seed for it in items], progress=False,
                              control=line_controls(pipe, first.control) if first.control else None)
            except FloatingPointError as e:
                lines = ", ".join(str(plan.items[i].line) for i in missing)
                warnings.warn(f"lines {lines}: {e}; these images were not made")
                failed += len(missing)
                bar.update(len(missing))
                continue
            for i, image in zip(batch, images):
                if i in done:
                    continue
                path = out / plan.items[i].file
                try:
                    manifest.append(_write_image(path, plan.items[i], image))
                except OSError as e:
                    raise OSError(e.errno, f"cannot write {path} or its manifest record: {e.strerror or e}; "
                                           f"{len(done) + made} images are finished and kept: free space (or fix "
                                           "the folder) and run the same command again to resume") from None
                made += 1
                bar.update(1)
    return made, len(done), failed


def _write_image(path: Path, item: Item, image) -> dict[str, Any]:
    """The PNG (metadata included) written atomically; returns its manifest record."""
    from PIL import PngImagePlugin

    chunks = PngImagePlugin.PngInfo()
    for key in (PARAMETERS_KEY, JSON_KEY):
        chunks.add_text(key, image.info[key])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunks)
    data = buffer.getvalue()
    write_atomic(path, data)
    return {**asdict(item), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _contact_sheet(out: Path, files: list[str]) -> None:
    """DIR/grid.png: every finished image in plan order, as thumbnails on a near-square grid."""
    from PIL import Image

    if not files:
        return
    thumbs = []
    for name in files:
        with Image.open(out / name) as im:
            im.thumbnail((GRID_CELL, GRID_CELL))
            thumbs.append(im.convert("RGB"))
    cell_w, cell_h = max(t.width for t in thumbs), max(t.height for t in thumbs)
    cols = math.ceil(math.sqrt(len(thumbs)))
    rows = math.ceil(len(thumbs) / cols)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    for k, thumb in enumerate(thumbs):
        r, c = divmod(k, cols)
        sheet.paste(thumb, (c * cell_w + (cell_w - thumb.width) // 2, r * cell_h + (cell_h - thumb.height) // 2))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_atomic(out / GRID, buffer.getvalue())
