"""ldm: latent text-to-image diffusion (Stable Diffusion family).

    from ldm import Pipeline
    images = Pipeline()("a turtle playing basketball")

``Pipeline`` is imported on first use, so ``import ldm`` (and ``ldm --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]

if TYPE_CHECKING:
    from ldm.pipeline import Pipeline


def __getattr__(name: str):
    if name == "Pipeline":
        from ldm.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
