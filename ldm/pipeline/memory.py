"""What a request will need, estimated from the model's configs before anything is allocated.

A request far too big for the machine (``--height 100000``) would otherwise start sampling, grow until the
kernel's OOM killer ends the process (exit 137, no message) and take other processes' memory with it. The
estimate counts the working memory of one call, on top of the weights that are already loaded:

* **latents**: the sampler's state (x, the denoised estimate, a multistep history, the guidance batch);
* **U-Net**: the skip connections held from the down path to the up path, plus the widest level's working
  tensors (ResNet input/norm/conv outputs, the transformer's GEGLU feed-forward at 8 × channels); one call
  carries 2 rows per image under classifier-free guidance, and on the CPU one image at a time (batch-invariant
  mode). Attention uses SDPA, whose CPU and CUDA kernels do not materialise the (tokens × tokens) scores;
  the ``sliced`` backend does, a slice of heads at a time, and is counted so;
* **VAE**: decoding (or encoding) one image at a time, the widest decoder level's working tensors at full
  resolution; with tiling, one tile's instead, plus the blended full-size image;
* **images**: the decoded float32 batch and its copies on the way to PIL.

The factors below are upper bounds chosen against measured peaks (scripts/bench_memory.py, figures in
docs/benchmarks.md), so an estimate errs on the side of the request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldm.models.attention import Attention

UNET_WORKING = 12       # live full-width tensors at a U-Net level besides the skips (ResNet in/norm/conv, cat,
                        # the packed convolution's reordered input and output)
FEED_FORWARD = 20       # a transformer level's extra: GEGLU's 2 × 4 × channels projection (Shazeer 2020), its
                        # gate and product (4 + 4), q/k/v and the attention output
VAE_WORKING = 6         # live full-width tensors at a VAE decoder level (input, norm, SiLU, conv, residual, ...)
FIXED = 96 * 2**20      # what any first call allocates: kernel workspaces, the allocator's pools, small tensors
LATENT_COPIES = 8       # x, denoised, history, noise, the CFG-doubled input and output
IMAGE_COPIES = 4        # decoded rows, their concatenation, the [0, 1] array, uint8 pixels
MARGIN = 0.9            # refuse when the estimate passes this fraction of the memory available


class NotEnoughMemory(ValueError):
    """A request whose estimated working memory exceeds what the device has free; the message says the size,
    the estimate, the memory available and the way out."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of working memory by part; ``total`` is the peak (the U-Net and VAE phases do not overlap)."""

    latents: int
    unet: int
    vae: int
    images: int

    @property
    def total(self) -> int:
        return FIXED + self.latents + max(self.unet, self.vae + self.images)

    def parts(self) -> str:
        return (f"U-Net {gib(self.unet)}, VAE {gib(self.vae)}, images {gib(self.images)}, "
                f"latents {gib(self.latents)}")


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 * 0.1 else f"{n / 2**20:.0f} MiB"


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def unet_bytes(config, h: int, w: int, rows: int, dtype: torch.dtype, attention_slice: int | None = None) -> int:
    """Working memory of one U-Net call on ``rows`` latents of h × w (see the module docstring); 0 for a
    network that is not an SD-family U-Net (a model plugged in by hand: nothing to estimate from)."""
    channels = getattr(config, "block_out_channels", None)
    if channels is None or not hasattr(config, "per_level"):
        return 0
    layers = config.per_level("layers_per_block")
    attention = [t.startswith("CrossAttn") for t in config.down_block_types]
    skips = widest = scores = 0
    for level, (c, n_layers, attn) in enumerate(zip(channels, layers, attention)):
        positions = math.ceil(h / 2**level) * math.ceil(w / 2**level)
        downsampler = level < len(channels) - 1
        skips += (n_layers + downsampler) * c * positions
        widest = max(widest, c * positions * (UNET_WORKING + (FEED_FORWARD if attn else 0)))
        if attn and attention_slice:
            scores = max(scores, attention_slice * positions * positions)
    skips += channels[0] * h * w  # conv_in's output, the first skip
    return rows * (skips + widest + scores) * _bytes(dtype)


def vae_bytes(config, height: int, width: int, dtype: torch.dtype, tile: int | None = None) -> int:
    """Working memory of decoding one image of height × width pixels (tiled: one tile of ``tile`` pixels)."""
    if tile is not None and max(height, width) > tile:
        height = width = tile
    levels = tuple(reversed(getattr(config, "block_out_channels", ())))
    widest = 0
    for i, c in enumerate(levels):
        scale = 2 ** (len(levels) - 1 - i)  # block i works at 1/scale of the output size ...
        after = scale // 2 if i < len(levels) - 1 else scale  # ... and its upsampler's output is twice that
        for s in (scale, after):
            widest = max(widest, c * math.ceil(height / s) * math.ceil(width / s))
    return VAE_WORKING * widest * _bytes(dtype)


def estimate(pipe, req) -> MemoryEstimate:
    """The working memory ``pipe`` will need for the validated request ``req`` (``Pipeline.request``)."""
    f = pipe.vae_scale_factor
    h, w = math.ceil(req.height / f), math.ceil(req.width / f)
    blocks = 1 if req.guidance == 1.0 else 2
    per_call = min(req.batch, pipe.micro_batch) if pipe.batch_invariant else req.batch
    rows = max(2, blocks * per_call) if pipe.batch_invariant else blocks * per_call
    layer = next((m for m in pipe.unet.modules() if isinstance(m, Attention)), None)
    sliced = layer is not None and layer.backend == "sliced"
    attention_slice = (layer.slice_size or max(pipe.unet.config.heads())) if sliced else None
    unet = unet_bytes(pipe.unet.config, h, w, rows, pipe.dtype, attention_slice)
    tiling = getattr(pipe.vae, "tiling", False)
    vae = vae_bytes(pipe.vae.config, req.height, req.width, pipe.vae_dtype, pipe.vae.tile_size if tiling else None)
    pixels = 3 * req.height * req.width
    images = req.batch * pixels * 4 * IMAGE_COPIES + (3 * pixels * 4 if tiling else 0)
    latents = LATENT_COPIES * req.batch * pipe.latent_channels * h * w * 4
    return MemoryEstimate(latents, unet, vae, images)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on ``device``: CUDA's free memory, or Linux's MemAvailable (RAM that
    can be had without swapping); None where it cannot be known (the check is then skipped)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(pipe, req) -> MemoryEstimate:
    """Raise ``NotEnoughMemory`` if the request cannot fit in what the device has free; returns the estimate."""
    need = estimate(pipe, req)
    free = available_bytes(pipe.device)
    if free is not None and need.total > MARGIN * free:
        ways = "a smaller size"
        if not getattr(pipe.vae, "tiling", False) and need.latents + need.unet <= MARGIN * free:  # the decode is what does not fit
            ways += " or VAE tiling (--vae-tiling, pipe.enable_vae_tiling())"
        if req.batch > 1:
            ways += " or fewer images per call"
        where = "this machine" if pipe.device.type == "cpu" else str(pipe.device)
        raise NotEnoughMemory(f"{req.width}x{req.height} ({req.batch} image{'s' * (req.batch > 1)}) needs about "
                              f"{gib(need.total)} of working memory ({need.parts()}), but {where} has {gib(free)} available; try {ways}")
    return need
