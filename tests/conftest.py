"""Shared pytest fixtures (generic; opt in per module).

Tests live in one folder per ldm package (tests/models/ for ldm/models/, ...; tests/diffusion/ for the math at the
top of ldm/). The helpers they share (tiny_models.py, gaussian.py, ...) sit here, beside this file, which puts
this folder on sys.path for them.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Pipelines in the tests run on PyTorch unless a test asks for backend="openvino" (tests/pipeline/
# test_openvino_backend.py): converting every tiny model the suite builds would cost seconds each. The cache of
# converted graphs goes to a folder of the session's own, never the user's.
os.environ.setdefault("LDM_BACKEND", "torch")


@pytest.fixture
def single_thread():
    """Run a test with one torch thread, restoring the previous count afterwards.

    For tests made of many operations on tiny tensors, on a shared CPU the hand-offs between threads cost more
    than the arithmetic.  Opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """A tiny random SD 1.x model saved as a diffusers folder (tests/tiny_models.py), built once per run."""
    from tiny_models import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "model", "sd1")
