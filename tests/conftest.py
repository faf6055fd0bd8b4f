"""Shared pytest fixtures (generic; opt in per module)."""

import pytest
import torch


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
