"""The ``ldm`` command line: ``ldm generate | batch | train | serve | convert | info | models | visualize``.

Commands are a registry (``COMMANDS``): each names a function that adds its arguments to an argparse parser and
a function that runs the parsed arguments, one module a command (``ldm/cli/generate.py``, ...). Only the chosen
command's module is imported, and the commands import torch and the models inside their run functions, so
``ldm --help`` and ``ldm generate --help`` are instant. A new command is one module plus one ``Command`` line
here; ``ldm.cli.options`` gives it the shared ``--model / --device / --dtype`` flags and checked argparse types.

The CLI sits on top of everything (it may import any part of ldm) and nothing in ldm imports it.

Errors in what the user typed (bad flag values, unreadable files, sizes, unknown names) end the process with
exit status 2 and ONE line on stderr, never a traceback (set LDM_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from dataclasses import dataclass

from ldm import __version__
from ldm.cli.options import UsageError


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    add_arguments: str  # "module:function", called with the subcommand's ArgumentParser
    run: str  # "module:function", called with the parsed Namespace; returns an exit status or None


COMMANDS = [
    Command("generate", "draw images from a prompt (or redo one from its PNG)",
            "ldm.cli.generate:generate_arguments", "ldm.cli.generate:generate"),
    Command("batch", "draw images for every line of a prompt file (resumable)",
            "ldm.cli.batch:add_arguments", "ldm.cli.batch:run"),
    Command("train", "train or fine-tune a model on captioned images",
            "ldm.train:add_arguments", "ldm.train:run"),
    Command("serve", "serve an A1111-compatible HTTP API, durable jobs and a web page",
            "ldm.cli.serve:add_arguments", "ldm.cli.serve:run"),
    Command("convert", "convert a model: SD single file <-> diffusers folder",
            "ldm.cli.models:convert_arguments", "ldm.cli.models:convert"),
    Command("info", "describe a checkpoint, or print the settings stored in an image",
            "ldm.cli.models:info_arguments", "ldm.cli.models:info"),
    Command("models", "list a models folder's checkpoints, LoRAs, VAEs, ControlNets and embeddings",
            "ldm.cli.library:add_arguments", "ldm.cli.library:run"),
    Command("visualize", "draw the forward/reverse diffusion figure",
            "ldm.cli.visualize:visualize_arguments", "ldm.cli.visualize:visualize"),
]
USAGE_ERRORS = (ValueError, OSError, ImportError)  # CheckpointError and bad-input errors are ValueErrors


class _HelpFormatter(argparse.HelpFormatter):
    """Help a little wider on the left, so "-o FILE, --output FILE" and "--strict, --no-strict" share their line."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=27)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; one line is enough
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)  # only --help/--version come before it
    chosen = next((c for c in COMMANDS if c.name == first), None)
    parser = Parser(prog="ldm", description="Latent text-to-image diffusion.",
                    epilog="`ldm COMMAND --help` shows a command's options.")
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.summary, description=command.summary,
                                  formatter_class=_HelpFormatter)
        if command is chosen:
            _resolve(command.add_arguments, command.name)(sub)
    args = parser.parse_args(argv)
    if chosen is None:
        parser.error(f"choose a command: {', '.join(c.name for c in COMMANDS)}")
    prog = f"ldm {chosen.name}"
    with _one_line_warnings():
        try:
            status = _resolve(chosen.run, chosen.name)(args)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except (UsageError, *USAGE_ERRORS) as e:
            if os.environ.get("LDM_DEBUG"):
                raise
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except FloatingPointError as e:
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return 1
    return int(status or 0)


def _resolve(target: str, command: str):
    module, _, function = target.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"ldm {command}: error: this command is not available in this installation ({e})")


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, KeyError) and type(error).__str__ is KeyError.__str__:  # str(KeyError('x')) is "'x'"
        text = f"missing key {text}"
    return text


@contextlib.contextmanager
def _one_line_warnings():
    """Show Python warnings as ``ldm: warning: ...`` (one line, no source excerpt) while a command runs."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"ldm: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


__all__ = ["main", "COMMANDS", "Command", "UsageError"]
