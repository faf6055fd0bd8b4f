"""Fast CPU paths for the convolutions and 1×1 projections of the U-Net and VAE (same parameters, same
state-dict keys, results equal to float rounding).

`Conv2d`: nn.Conv2d on the CPU hands each call to oneDNN, which first converts the weights to its blocked
layout, every call. For SD's 3×3 kernels on small maps that conversion costs as much as the convolution
(1280 channels: ~60 MB of traffic per call). Without autograd, on float32 CPU tensors, Conv2d converts the
weights once, keeps them, and calls oneDNN's convolution on the converted copy (the op torch.compile's CPU
backend uses). Measured on fp32, 1 thread: 1.1-2.3x faster per convolution on maps of at most 1024 output
positions (batch x height x width), slower on bigger ones, where the conversion is cheap next to the
arithmetic: there plain nn.Conv2d keeps the call (PACK_MAX_POSITIONS). The output has the input's memory
format, as with nn.Conv2d. With autograd, inside torch.compile (the compiler lowers
plain convolutions itself), or when oneDNN is unavailable, it is plain nn.Conv2d.

Memory: by default a layer keeps its packed copy beside the plain weight once it has run on a small map: up
to 2/3 of SD 1.5's U-Net again (+2.3 GB in fp32). `pack_for_inference(module)` makes the layers of a module
used for inference *lean*: once a layer has packed its weight it releases the plain weight's storage, so one
copy stays. The conversion is a pure reordering of the values, so the plain weight comes back exactly
(checked before releasing) whenever the module hands it out: `layer.weight`, `parameters()`,
`named_parameters()`, `state_dict()`, `load_state_dict()`, `.to()` and friends, a forward with autograd or on
a big map, copying and pickling. Weights that are views of a mapped checkpoint file (safetensors loads them
so) have their pages handed back to the kernel instead (`ldm.pages.page_out`). A new input shape repacks from a dense
copy made on the fly (oneDNN picks its layout per shape), so one packed copy is alive per layer. The
Parameter objects stay the same, but a weight reference held across a lean forward and used without going
through the module finds an empty tensor (an optimizer or EMA step fails on its shape; the values are safe
in the layer, and come back in that same Parameter as soon as the module hands it out): call
`unpack(module)` before working on the weights, or do not opt in (training code).
`Conv2d.prepack = False` turns packing off. bfloat16 takes the same path (weights and input both bf16): on CPUs
with native bf16 (AVX-512 BF16, AMX) oneDNN's bf16 kernels run on the packed copy at about twice float32's rate.

`inference_layout(x)`: the U-Net and the VAE run CPU inference in channels-last (NHWC) order. oneDNN's
convolutions compute in it natively (an NCHW input costs a reorder before and after every convolution), and
GroupNorm, SiLU, nearest upsampling and the token projections keep it, so the map stays NHWC from the first
convolution to the last; `Conv2d.channels_last = False` keeps NCHW. Values change by float rounding only.

`tokens_in` / `tokens_out`: the 1×1 projections between a (B, C, H, W) map and (B, H·W, C) tokens as GEMMs
(conv and linear projections alike); back to the map, W·tokens^T lands in NCHW order with no permuted copy.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ldm.pages import page_out

PACK_MAX_POSITIONS = 1024
PACKED_DTYPES = (torch.float32, torch.bfloat16)
def graph_capture() -> bool:
    """True while a compiler or tracer records the network (torch.compile, torch.export, torch.jit.trace, which
    OpenVINO's converter uses): the eager-only fast paths (packed weights, caches, per-row kernels) step aside
    so the graph holds plain operators, which the compiler fuses and lays out itself."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _channels_last(x: torch.Tensor) -> bool:
    """Strictly channels-last (a tensor that is both, e.g. 1×1 maps, counts as plain contiguous)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class Conv2d(nn.Conv2d):
    """nn.Conv2d that, for CPU inference in float32 or bfloat16, runs on weights converted once to oneDNN's layout."""

    prepack = True
    channels_last = True
    pack_max_positions: int | None = None    # this layer's own limit (a benchmark's switch); None: PACK_MAX_POSITIONS

    def __getstate__(self):
        # The packed copy is an opaque oneDNN tensor that cannot be copied or pickled; it is remade on use. A
        # lean layer's copy gets its plain weight back (and stays lean, see __setstate__).
        self._restore()
        state = super().__getstate__()
        state.pop("_packed", None)
        state["_parameters"] = dict(state["_parameters"])
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.__dict__.get("_lean"):
            self.__dict__["_parameters"] = _LeanParameters(self.__dict__["_parameters"], self)

    def _plain_weight(self) -> torch.Tensor | None:
        """The weight Parameter without the restore that `self.weight` triggers on a lean layer."""
        return dict.get(self.__dict__["_parameters"], "weight")

    def _packed_weight(self, x: torch.Tensor):
        """oneDNN-layout copy of the weight, made on first use and remade when the weight changes (new storage
        or an in-place update) or the input shape does; None when this layer or this build cannot use it.
        oneDNN chooses the blocked layout for the input shape it is given, and the layout decides the order of
        the sums: keying on the shape keeps an output independent of which shapes the layer saw before."""
        shape = tuple(x.shape)
        cached = self.__dict__.get("_packed")
        if self.__dict__.get("_released"):
            if cached[0][-1] == shape:
                return cached[1]
            source = cached[1].to_dense()   # exact: the packed copy is a reordering of the plain values
        else:
            w = self._plain_weight()
            key = (w.data_ptr(), w._version, w.dtype, shape)
            if cached is not None and cached[0] == key:
                return cached[1]
            source = w.detach()
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                source.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(shape))
        except (RuntimeError, AttributeError):
            if self.__dict__.get("_released"):
                return None          # the caller falls back to nn.Conv2d, whose self.weight restores
            packed = None
        if self.__dict__.get("_released"):
            self.__dict__["_packed"] = (("released", shape), packed)
        else:
            self.__dict__["_packed"] = (key, packed)
            if packed is not None and self.__dict__.get("_lean"):
                self._release(packed, shape)
        return packed

    def _release(self, packed, shape: tuple[int, ...]) -> None:
        """Free the plain weight's storage, keeping the Parameter (and its shape, dtype, device), once the packed
        copy is known to give it back exactly."""
        w = self._plain_weight()
        dense = packed.to_dense()
        if not (w.is_contiguous() and dense.shape == w.shape and torch.equal(dense, w.detach())):
            return
        if not w.untyped_storage().resizable():   # not torch's own memory, e.g. a mapped checkpoint file
            page_out(w)
        with torch.inference_mode(False):    # inference tensors could never take part in autograd again
            # Empty, not merely storage-less: a stale reference used outside the module then fails on shapes
            # (an optimizer or EMA step, a matmul) instead of reading freed memory.
            self.__dict__["_weight_shape"] = w.shape
            w.data = w.new_empty(0)
        self.__dict__["_packed"] = (("released", shape), packed)
        self.__dict__["_released"] = True

    def _restore(self) -> None:
        """Give a released weight its values back (a dense copy of the packed one) and drop the packed copy."""
        if not self.__dict__.get("_released"):
            return
        w = self._plain_weight()
        with torch.inference_mode(False):
            w.data = self.__dict__["_packed"][1].to_dense().view(self.__dict__["_weight_shape"])
        self.__dict__["_packed"] = None
        self.__dict__["_released"] = False

    def _output_positions(self, x: torch.Tensor) -> int:
        h, w = ((x.shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
                // self.stride[i] + 1 for i in range(2))
        return x.shape[0] * h * w

    def _fast_path_applies(self, x: torch.Tensor) -> bool:
        if graph_capture() or parametrize.is_parametrized(self) or self._plain_weight() is None:
            return False
        return (self.prepack and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4
                and x.dtype in PACKED_DTYPES and self._plain_weight().dtype == x.dtype
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
                and self._output_positions(x) <= (self.pack_max_positions if self.pack_max_positions is not None
                                                  else PACK_MAX_POSITIONS)
                and torch.backends.mkldnn.is_available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_path_applies(x):
            packed = self._packed_weight(x)
            if packed is not None:
                out = torch.ops.mkldnn._convolution_pointwise(
                    x, packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
                    "none", [], "")
                # oneDNN answers channels-last; give back the input's layout, as nn.Conv2d does (GroupNorm, the
                # next op, is several times slower on channels-last CPU tensors).
                return out.contiguous(memory_format=torch.channels_last if _channels_last(x) else
                                      torch.contiguous_format)
        return super().forward(x)   # reads self.weight, which restores a released weight


class _LeanParameters(dict):
    """The `_parameters` of a lean Conv2d. nn.Module reads its parameters only through this dict (attribute
    access, parameters(), state_dict(), load_state_dict(), _apply()), so handing the weight out, listing the
    values or changing the dict first gives a released weight its values back. Names alone (`in`, keys())
    restore nothing, and neither does the bias, which is never released."""

    def __init__(self, items, owner: Conv2d):
        super().__init__(items)
        self.owner = weakref.ref(owner)

    def restore(self) -> None:
        owner = self.owner()
        if owner is not None:
            owner._restore()

    def __getitem__(self, name):
        if name == "weight":
            self.restore()
        return super().__getitem__(name)

    def get(self, name, default=None):
        if name == "weight":
            self.restore()
        return super().get(name, default)

    def items(self):
        self.restore()
        return super().items()

    def values(self):
        self.restore()
        return super().values()

    def __setitem__(self, name, value):
        self.restore()
        super().__setitem__(name, value)

    def __delitem__(self, name):
        self.restore()
        super().__delitem__(name)

    def pop(self, *args):
        self.restore()
        return super().pop(*args)

    def copy(self):
        self.restore()
        return dict(self)


def pack_for_inference(module: nn.Module) -> nn.Module:
    """Make every ldm Conv2d in `module` lean (see the module docstring): after its first packed call a layer
    holds only the packed copy of its weight. For modules used for inference; returns `module`."""
    for layer in module.modules():
        if isinstance(layer, Conv2d) and not layer.__dict__.get("_lean"):
            layer.__dict__["_lean"] = True
            layer.__dict__["_parameters"] = _LeanParameters(layer.__dict__["_parameters"], layer)
    return module


def unpack(module: nn.Module) -> nn.Module:
    """Undo `pack_for_inference`: every plain weight back in place; the layers go back to keeping a packed copy
    beside it."""
    for layer in module.modules():
        if isinstance(layer, Conv2d) and layer.__dict__.get("_lean"):
            layer._restore()
            layer.__dict__["_parameters"] = dict(layer.__dict__["_parameters"])
            layer.__dict__["_lean"] = False
    return module


def inference_layout(x: torch.Tensor) -> torch.Tensor:
    """x in channels-last order when a network runs CPU inference on it (no autograd, `Conv2d.channels_last`),
    else x itself; see the module docstring."""
    if (Conv2d.channels_last and not torch.is_grad_enabled() and not graph_capture()
            and x.device.type == "cpu" and x.dim() == 4):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C), contiguous (a free view of a channels-last map; otherwise a copy, which
    the linear layers that follow would make anyway, and slower, on a strided input)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def tokens_to_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, H·W, C) -> (B, C, H, W) in the memory format of `like`."""
    b, c, h, w = like.shape
    if _channels_last(like):
        return tokens.view(b, h, w, c).permute(0, 3, 1, 2)
    return tokens.transpose(1, 2).reshape(b, c, h, w)


def tokens_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H·W, C_out) tokens through a 1×1 projection (conv weight (C_out, C, 1, 1) or
    linear weight (C_out, C)): tokens = x^T W^T + b."""
    return F.linear(map_to_tokens(x), weight.flatten(1), bias)


def tokens_out(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor
               ) -> torch.Tensor:
    """(B, H·W, C_in) tokens -> (B, C_out, H, W) map through a 1×1 projection, in the memory format of the
    map `like` (channels-last: tokens W^T + b viewed as NHWC; otherwise W tokens^T + b, contiguous)."""
    b, _, h, w = like.shape
    if _channels_last(like):
        return tokens_to_map(F.linear(tokens, weight.flatten(1), bias), like)
    out = torch.matmul(weight.flatten(1), tokens.transpose(1, 2))
    if bias is not None:
        out = out + bias[:, None]
    return out.view(b, -1, h, w)
