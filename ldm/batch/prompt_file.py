"""Prompt files for ``ldm batch``: .txt, .jsonl and .csv (or stdin), read and checked line by line.

Every line becomes a :class:`PromptLine` (its 1-based line number in the file, the prompt, and the options it
sets) or a :class:`Problem` that names ``file:line`` and says what is wrong. Nothing stops at the first bad line:
the whole file is checked so that one run reports every mistake.

Formats:

* ``.txt`` — one prompt a line; blank lines and lines starting with ``#`` are skipped. Options may follow the
  prompt, shell-quoted: ``a red apple --n "blurry, dark" --s 42 --w 512 --h 512 --l 7.5 --steps 30 --sampler
  euler``. The text before the first ``--option`` is the prompt, taken as written (apostrophes need no quoting);
  a line may also start with ``--prompt "..."``.
* ``.jsonl`` — one JSON object a line: ``{"prompt": ..., "negative_prompt": ..., "seed": ..., ...}``.
* ``.csv`` — a header row naming the same keys, then one row per prompt; empty cells are "not given".

Control units (``control``): ``--control MODEL:IMAGE[:WEIGHT[:START[:END]]][:module=canny]`` in a .txt line
(repeatable), as ``ldm generate --control`` takes them; in .jsonl a spec string, an object ``{"model": ...,
"image": ..., "weight": ..., "module": ...}`` or a list of them; in .csv a spec string or a JSON list.

Choices (see docs/batch.md): a prompt longer than the text encoder's 75 tokens is kept whole and warned about
(the encoder reads its first 75 tokens, and the PNG records the full text, so the image can be made again); a
NUL character is an error (PNG text cannot hold it, and it usually means a UTF-16 file).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import re
import shlex
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from ldm.models.tokenizer import bundled_tokenizer
from ldm.samplers import SAMPLERS

FORMATS = ("txt", "jsonl", "csv")
SUFFIXES = {".txt": "txt", ".prompts": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
KEYS = ("prompt", "negative_prompt", "seed", "width", "height", "guidance", "steps", "sampler", "control")
TXT_OPTIONS = {
    "--prompt": "prompt",
    "--n": "negative_prompt", "--negative": "negative_prompt", "--negative_prompt": "negative_prompt",
    "--s": "seed", "--seed": "seed",
    "--w": "width", "--width": "width",
    "--h": "height", "--height": "height",
    "--l": "guidance", "--guidance": "guidance", "--cfg_scale": "guidance",
    "--steps": "steps",
    "--sampler": "sampler", "--sampler_name": "sampler",
    "--control": "control",   # repeatable: one control unit each (ldm.batch.control_units)
}
# Names other tools use for our keys: suggested when they appear in a .jsonl/.csv file.
FOREIGN_KEYS = {"negative": "negative_prompt", "cfg_scale": "guidance", "cfg": "guidance", "sampler_name": "sampler",
                "num_inference_steps": "steps", "guidance_scale": "guidance", "text": "prompt"}
SIZE_MULTIPLE = 8  # the VAE halves the image 3 times (SD's 8x latent downsampling)
TOKEN_LIMIT = 75  # CLIP's 77-token context minus its start and end tokens
_OPTION_START = re.compile(r"(?:^|\s)--[A-Za-z]")


@dataclass(frozen=True)
class Problem:
    """Something wrong (or worth a warning) at one line of a prompt file."""

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


@dataclass(frozen=True)
class PromptLine:
    """One valid prompt: its line number, the prompt, and the options the line sets (typed, keys from KEYS)."""

    line: int
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptFile:
    source: str  # the file name as the user gave it ("<stdin>" for -)
    format: str
    lines: list[PromptLine]
    errors: list[Problem]
    warnings: list[Problem]
    digest: str  # sha256 of the raw bytes


class _Invalid(Exception):
    """A line's problem, raised inside one line's parsing and collected by the file loop."""


def read_prompt_file(path: str, fmt: str | None = None, *, stdin=None, samplers: Collection[str] | None = None
                     ) -> PromptFile:
    """Read and check a prompt file (``-``: ``stdin``, a binary stream). ``fmt``: txt | jsonl | csv, else the
    suffix decides (stdin: a first line starting with ``{`` means jsonl, else txt)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown prompt file format {fmt!r}; use one of {', '.join(FORMATS)}")
    if path == "-":
        if stdin is None:
            raise ValueError("prompt file '-' means standard input, but no input stream was given")
        return parse_prompts(stdin.read(), "<stdin>", fmt, samplers=samplers)
    p = Path(path)
    if fmt is None:
        fmt = SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            raise ValueError(f"cannot tell the format of {path!r} from its suffix; name it .txt, .jsonl or .csv, "
                             "or pass --format txt|jsonl|csv")
    if p.is_dir():
        raise ValueError(f"prompt file {path!r} is a folder")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"prompt file {path!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"cannot read prompt file {path!r}: {e.strerror or e}") from None
    return parse_prompts(data, path, fmt, samplers=samplers)


def parse_prompts(data: bytes, source: str, fmt: str | None = None, *, samplers: Collection[str] | None = None
                  ) -> PromptFile:
    """Check every line of a prompt file's bytes; see the module docstring for the formats. ``fmt`` None: the
    suffix of ``source`` decides, else the content (a first line starting with ``{`` means jsonl)."""
    if samplers is None:
        samplers = tuple(SAMPLERS)
    result = PromptFile(source, "", [], [], [], hashlib.sha256(data).hexdigest())
    lines = _decode_lines(data, result)
    result.format = fmt or SUFFIXES.get(Path(source).suffix.lower()) or _sniff(lines)
    checker = _Checker(result, samplers)
    if result.format == "csv":
        records = _csv_records(lines, result)
    else:
        parse = _txt_record if result.format == "txt" else _json_record
        records = ((n, text, parse) for n, text in lines if text.strip() and not text.lstrip().startswith("#"))
    for n, raw, parse in records:
        try:
            checker.add(n, parse(raw))
        except _Invalid as e:
            result.errors.append(Problem(source, n, str(e)))
    result.errors.sort(key=lambda p: p.line)
    return result


def nearest(name: str, known: Iterable[str], aliases: dict[str, str] | None = None) -> str:
    """`` (did you mean 'x'?)`` for the closest known name (difflib ratio), or ``""``."""
    known = list(known)
    if aliases and name.lower() in aliases:
        return f" (did you mean {aliases[name.lower()]!r}?)"
    match = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ---------------------------------------------------------------------- bytes -> lines
def _decode_lines(data: bytes, result: PromptFile) -> list[tuple[int, str]]:
    """(line number, text) for every physical line; a line that is not UTF-8 is an error and is dropped."""
    out = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if n == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Excel writes one)
        try:
            out.append((n, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            hint = " (a UTF-16 file? save it as UTF-8)" if b"\0" in raw else ""
            result.errors.append(Problem(result.source, n, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column "
                                                           f"{e.start + 1}{hint}; save the file as UTF-8"))
    if out and out[-1][1] == "" and data.endswith(b"\n"):
        out.pop()  # the empty "line" after the final newline
    return out


def _sniff(lines: list[tuple[int, str]]) -> str:
    first = next((t.strip() for _, t in lines if t.strip() and not t.lstrip().startswith("#")), "")
    return "jsonl" if first.startswith("{") else "txt"


# ---------------------------------------------------------------------- one record per format
def _txt_record(text: str) -> dict[str, Any]:
    """``prompt --opt value ...`` -> {key: string value}; the prompt part is taken verbatim."""
    text = text.strip()
    match = _OPTION_START.search(text)
    prompt, rest = (text, "") if match is None else (text[: match.start()].strip(), text[match.start():])
    try:
        tokens = shlex.split(rest)
    except ValueError as e:  # "No closing quotation", "No escaped character"
        raise _Invalid(f"cannot read the options {rest.strip()!r}: {str(e).lower()}") from None
    record: dict[str, Any] = {"prompt": prompt} if prompt else {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, inline = token.partition("=")
        key = TXT_OPTIONS.get(name)
        if key is None:
            options = sorted(TXT_OPTIONS)
            hint = nearest(name, options) if name.startswith("--") else ""
            raise _Invalid(f"unknown option {name!r}{hint}; options are {', '.join(options)}"
                           if name.startswith("--") else f"unexpected {token!r} after the options (quote values "
                                                         "that hold spaces)")
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(tokens) and tokens[i + 1] not in TXT_OPTIONS:
            value, i = tokens[i + 1], i + 2
        else:
            raise _Invalid(f"option {name} needs a value")
        if key == "control":
            record.setdefault(key, []).append(value)
            continue
        if key in record:
            raise _Invalid(f"{key.replace('_', ' ')} given twice" + (" (text before the options is the prompt)"
                                                                      if key == "prompt" else f" ({name})"))
        record[key] = value
    return record


def _json_record(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise _Invalid(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(value, dict):
        raise _Invalid(f"expected a JSON object {{\"prompt\": ...}}, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise _Invalid(f"key {repeated[0]!r} appears twice")
    return dict(pairs)


def _csv_records(lines: list[tuple[int, str]], result: PromptFile):
    """(first line number of the row, {column: cell}, identity) for every data row; header problems go to
    ``result.errors`` against the header's line."""
    numbers = [n for n, _ in lines]
    reader = csv.reader((t + "\n" for _, t in lines), strict=True)
    header: list[str] | None = None
    header_line = consumed = 0
    while True:
        start = numbers[consumed] if consumed < len(numbers) else (numbers[-1] if numbers else 1)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            result.errors.append(Problem(result.source, start, f"malformed CSV: {e}"))
            break
        consumed = reader.line_num
        if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if header is None:
            header, header_line = [c.strip() for c in row], start
            for column in header:
                if column not in KEYS:
                    hint = nearest(column, KEYS, FOREIGN_KEYS)
                    result.errors.append(Problem(result.source, start, f"unknown column {column!r}{hint}; "
                                                                       f"columns are {', '.join(KEYS)}"))
            if "prompt" not in header:
                result.errors.append(Problem(result.source, start, f"the header has no 'prompt' column "
                                                                   f"(found: {', '.join(header)})"))
            continue
        if len(row) != len(header):
            result.errors.append(Problem(result.source, start, f"row has {len(row)} fields but the header (line "
                                                               f"{header_line}) names {len(header)}"))
            continue
        record = {k: v for k, v in zip(header, row) if k in KEYS and (v.strip() or k == "prompt")}
        yield start, record, _identity


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    return record


# ---------------------------------------------------------------------- values
class _Checker:
    """Turns a record (raw values) into a PromptLine, or raises _Invalid naming the first bad key/value."""

    def __init__(self, result: PromptFile, samplers: Collection[str]):
        self.result, self.samplers, self._tokenizer = result, tuple(samplers), None

    def add(self, line: int, record: dict[str, Any]) -> None:
        unknown = [k for k in record if k not in KEYS]
        if unknown:
            hints = ", ".join(f"{k!r}{nearest(k, KEYS, FOREIGN_KEYS)}" for k in unknown)
            raise _Invalid(f"unknown key{'s' if len(unknown) > 1 else ''} {hints}; keys are {', '.join(KEYS)}")
        prompt = self._text(record.get("prompt"), "prompt")
        if prompt is None or not prompt.strip():
            raise _Invalid("empty prompt")
        options = {k: self._value(k, v) for k, v in record.items() if k != "prompt"}
        self._warn_if_long(line, prompt)
        self.result.lines.append(PromptLine(line, prompt.strip(), options))

    def _value(self, key: str, value: Any) -> Any:
        if key == "negative_prompt":
            return self._text(value, key)
        if key == "control":
            return _control(value)
        if key == "sampler":
            name = self._text(value, key).strip()
            if name not in self.samplers:
                raise _Invalid(f"unknown sampler {name!r}{nearest(name, self.samplers)}; samplers are "
                               f"{', '.join(sorted(self.samplers))}")
            return name
        if key == "guidance":
            number = _number(value, key)
            if not math.isfinite(number):
                raise _Invalid(f"guidance must be a finite number, got {value!r}")
            return number
        number = _integer(value, key)
        if key == "seed" and not 0 <= number < 2**64:
            raise _Invalid(f"seed {number} is outside [0, 2**64)")
        if key == "steps" and number < 1:
            raise _Invalid(f"steps must be at least 1, got {number}")
        if key in ("width", "height"):
            if number < SIZE_MULTIPLE:
                raise _Invalid(f"{key} must be at least {SIZE_MULTIPLE}, got {number}")
            if number % SIZE_MULTIPLE:
                raise _Invalid(f"{key} {number} is not divisible by {SIZE_MULTIPLE} "
                               f"(try {number // SIZE_MULTIPLE * SIZE_MULTIPLE})")
        return number

    @staticmethod
    def _text(value: Any, key: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise _Invalid(f"{key} must be a string, got {json.dumps(value)}")
        if "\0" in value:
            raise _Invalid(f"{key} holds a NUL character at position {value.index(chr(0)) + 1}; PNG text cannot "
                           "store it (a UTF-16 file? save it as UTF-8)")
        return value

    def _warn_if_long(self, line: int, prompt: str) -> None:
        """Warn when the text encoder will not read the whole prompt (CLIP's 77-token context)."""
        if len(prompt) < 2 * TOKEN_LIMIT:  # every CLIP token covers at least one character... usually more
            return
        if self._tokenizer is None:
            self._tokenizer = bundled_tokenizer()
        problem = _long_prompt(self._tokenizer, self.result.source, line, prompt, TOKEN_LIMIT)
        if problem is not None:
            self.result.warnings.append(problem)


def _long_prompt(tokenizer, source: str, line: int, prompt: str, limit: int) -> Problem | None:
    tokens = len(tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids)
    if tokens <= limit:
        return None
    return Problem(source, line, f"prompt is {tokens} tokens ({len(prompt)} characters) long; the text encoder "
                                 f"reads only the first {limit}, the rest has no effect on the image")


def long_prompts(result: PromptFile, tokenizer, limit: int) -> list[Problem]:
    """Warnings for the prompts a text encoder with a context shorter than CLIP's reads only in part: ``limit``
    tokens between the start and end tokens, counted by the model's own ``tokenizer``. Reading the file already
    warned about prompts past TOKEN_LIMIT."""
    if limit >= TOKEN_LIMIT:
        return []
    problems = (_long_prompt(tokenizer, result.source, p.line, p.prompt, limit) for p in result.lines)
    return [p for p in problems if p is not None]


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        raise _Invalid(f"{key} must be an integer, got {json.dumps(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise _Invalid(f"{key} must be an integer, got {value if isinstance(value, str) else json.dumps(value)!r}")


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise _Invalid(f"{key} must be a number, got {json.dumps(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise _Invalid(f"{key} must be a number, got {value!r}") from None


def _control(value: Any) -> tuple[str, ...]:
    """A line's control units (``ldm.batch.control_units``) as canonical JSON strings (hashable: they are part
    of an image's settings and of the plan a resumed run is compared with)."""
    from ldm.batch.control_units import units_from_value

    if isinstance(value, str) and value.lstrip().startswith("["):   # a CSV cell holding a JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _Invalid(f"control: invalid JSON list: {e.msg} at column {e.colno}") from None
    try:
        return tuple(json.dumps(u.to_dict(), sort_keys=True) for u in units_from_value(value))
    except ValueError as e:
        raise _Invalid(str(e)) from None
