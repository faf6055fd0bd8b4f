"""The layout of ldm/ (docs/internals.md): imports point one way, and the house stays tidy.

    the diffusion math (top-level modules) <- models <- checkpoints <- pipeline <- train, batch <- serve <- cli

A package may import only the layers below it; nothing imports ``cli``. Checked twice: statically over every
import statement (function-level ones included), and by importing each package in a fresh interpreter and
looking at what it pulled in.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LDM = ROOT / "ldm"
MATH = {"schedules", "denoiser", "guidance", "samplers", "losses", "rng", "devices", "files", "pages", "assets"}
# package -> the ldm packages it may import (the math is open to everyone)
ALLOWED = {
    "math": set(),
    "models": set(),
    "checkpoints": {"models"},
    "pipeline": {"models", "checkpoints"},
    "train": {"models", "checkpoints", "pipeline"},
    "batch": {"models", "checkpoints", "pipeline"},
    "serve": {"models", "checkpoints", "pipeline", "batch"},
    "examples": {"models", "checkpoints", "pipeline", "train"},
    "cli": {"models", "checkpoints", "pipeline", "train", "batch", "serve"},
}


def layer(module: str) -> str:
    """'ldm.models.unet' -> 'models'; the top-level math modules and ldm itself -> 'math'."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in MATH or parts[1] in ("__init__", "__main__", "__version__"):
        return "math"
    return parts[1]


def imports(path: Path) -> set[str]:
    names = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)   # `from ldm import batch` imports ldm.batch
    return {n for n in names if n == "ldm" or n.startswith("ldm.")}


def modules() -> list[Path]:
    return sorted(LDM.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    own = layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
    if path.parent == LDM and path.stem in ("__init__", "__main__", "prompting"):
        return   # ldm/__init__ re-exports Pipeline lazily, ldm.prompting the prompt parser; __main__ is the CLI
    wrong = sorted(m for m in imports(path) if layer(m) not in ALLOWED[own] | {"math", own}
                   and not (layer(m) == "ldm" and m == "ldm"))
    assert not wrong, f"{path.relative_to(ROOT)} ({own}) imports {wrong}; it may import {sorted(ALLOWED[own])}"


@pytest.mark.parametrize("package", ["models", "checkpoints", "pipeline", "train", "batch"])
def test_a_package_loads_nothing_above_it(package):
    code = f"import sys, json, ldm.{package}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('ldm.'))))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT, timeout=120).stdout)
    above = sorted(m for m in loaded if layer(m) not in ALLOWED[package] | {"math", package})
    assert not above, f"importing ldm.{package} loads {above}"


def test_the_house_stays_tidy():
    top = [p for p in LDM.glob("*.py")]
    assert len(top) <= 16, f"{len(top)} modules at the top of ldm/"
    for package in (p for p in LDM.iterdir() if (p / "__init__.py").is_file()):
        count = len(list(package.glob("*.py")))
        assert count <= 14, f"{package.name}/ holds {count} modules"
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), f"{package.name}/ has no docstring"
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"
