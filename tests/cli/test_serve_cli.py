"""``ldm serve`` on the command line: its flags, and the one-line hint when the serve extra is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Run `ldm serve` with fastapi made unimportable, as in an installation without the serve extra.
WITHOUT_FASTAPI = "import sys; sys.modules['fastapi'] = None; from ldm.cli import main; sys.exit(main(sys.argv[1:]))"


def ldm(*argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "ldm", *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_serve_without_the_extra_names_it_in_one_line():
    done = ldm("serve", "--port", "7999", code=WITHOUT_FASTAPI)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "ldm-diffusion[serve]" in done.stderr and done.stdout == ""


def test_serve_help_lists_its_flags_and_binds_loopback_by_default():
    done = ldm("serve", "--help")
    assert done.returncode == 0
    for flag in ("--model", "--host", "--port", "--data", "--api-key", "--max-queue", "--max-size", "--max-steps"):
        assert flag in done.stdout
    assert "default 127.0.0.1" in done.stdout and "7860" in done.stdout


def test_bad_serve_flags_are_one_line_usage_errors():
    for argv in (("--port", "70000"), ("--max-queue", "0"), ("--max-steps", "x")):
        done = ldm("serve", *argv)
        assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
