"""ldm: latent text-to-image diffusion (Stable Diffusion family).

    from ldm import Pipeline
    images = Pipeline()("a turtle playing basketball")

``Pipeline`` and ``Control`` (a control unit of a request) are imported on first use, so ``import ldm`` (and
``ldm --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Pipeline", "Control", "__version__"]

if TYPE_CHECKING:
    from ldm.pipeline import Control, Pipeline


def __getattr__(name: str):
    if name in ("Pipeline", "Control"):
        import ldm.pipeline

        return getattr(ldm.pipeline, name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
