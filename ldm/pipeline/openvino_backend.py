"""OpenVINO as the CPU runtime of ldm's own networks: the U-Net and the VAE decoder, exported from the PyTorch
modules the pipeline holds (so LoRAs, embeddings, prompt syntax and every sampler keep working), compiled for
static shapes, one image row at a time.

Why: on a CPU the default model's U-Net is a few hundred operators of tens of microseconds each, and PyTorch's
eager dispatch between them is a large part of the call. OpenVINO compiles the whole graph once (weights packed
once, convolution + bias + residual + activation fused, GroupNorm as one kernel) and runs it with no framework
between the operators: measured on ldm's default U-Net at 16×16 latents, 2 threads, float32 (AMD EPYC,
`avx512_bf16`): eager 27 ms per classifier-free pair, OpenVINO 18 ms for the pair as one batch-2 call and 12 ms
as two batch-1 calls run side by side on one thread each (docs/benchmarks.md).

How the rows run: every call of a compiled network sees exactly one row (batch 1, static shape), and the rows
of a batch run as parallel requests, one per stream (`streams` = 2 on 2+ threads, each with half the threads)
for maps under ROW_STREAMS_MAX_POSITIONS; larger maps split well over threads (SD 1.5 at 256²: a CFG pair
costs the same either way), so there one stream takes every thread, and a lone row (guidance 1, LCM, a
distilled model: no classifier-free batch) is not left with half the cores.
Small convolutions do not split well over threads; two independent rows do. It also makes batch invariance
exact by construction: a row's arithmetic is that of the one compiled batch-1 graph, whatever its batch mates.

Conversion: `openvino.convert_model` over a TorchScript trace of the module. While a tracer records, ldm's
eager-only fast paths step aside (packed convolutions, the K/V cache, per-row GEMMs: ldm.models.conv.
graph_capture) and the upsampler takes its sub-pixel form in plain operators. The converted IR is cached
on disk (`cache_dir()`: $LDM_CACHE_DIR/openvino, default ~/.cache/ldm/openvino) under a key made of the
weights' bytes, the module's class and config, the input shapes and the versions of ldm, torch and OpenVINO,
so a LoRA, another model or another release never reuses a stale graph; a cache entry that does not load is
deleted and rebuilt. Entries are written to a temporary folder and renamed into place, so two processes that
share the folder never see half an entry. Compiled blobs are not cached (OpenVINO's CACHE_DIR): importing one
peaked higher than compiling the graph (SD 1.5's U-Net: 5.2 against 1.9 GB) and saved no time.

Precision follows the pipeline's dtype: float32 runs OpenVINO in f32 (differences from eager are float
rounding, ~1e-6), bfloat16 in bf16. Anything unusual (not a CPU, autograd, a non-tensor input, OpenVINO
missing or failing) runs the PyTorch module instead, with one warning when OpenVINO itself failed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ldm import pages

# Converting traces the module with torch.jit.trace, which warns that it is deprecated and, when its check run
# takes ldm's eager fast paths, that the two runs differ by float rounding: noise to a user, never an error.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated", category=FutureWarning)

BACKENDS = ("auto", "torch", "openvino")
ENV_BACKEND = "LDM_BACKEND"     # overrides backend="auto" (e.g. LDM_BACKEND=torch)
ENV_CACHE = "LDM_CACHE_DIR"
# a row's latent positions (H·W) from which one stream with every thread serves it better than parallel rows
ROW_STREAMS_MAX_POSITIONS = 32 * 32


def available() -> bool:
    """True when the openvino package can be imported."""
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """"torch" or "openvino" for a pipeline on `device`. "auto" (or None): $LDM_BACKEND if set, else OpenVINO on
    the CPU when it is installed. "openvino" asked for explicitly on another device, or without the package,
    is a clear error."""
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get(ENV_BACKEND, "auto") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "openvino" if device.type == "cpu" and available() else "torch"
    if name == "openvino":
        if device.type != "cpu":
            raise ValueError(f"backend='openvino' runs on the CPU only, not on {device}")
        if not available():
            raise ImportError("backend='openvino' needs the openvino package: pip install openvino")
    return name


def cache_dir() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "ldm")
    return Path(root) / "openvino"


@functools.cache
def _core():
    import openvino as ov

    return ov.Core()


def _versions() -> dict[str, str]:
    import openvino as ov

    from ldm import __version__ as ldm_version
    return {"ldm": ldm_version, "torch": torch.__version__, "openvino": ov.get_version()}


def _parameters(module: nn.Module):
    """(name, tensor) of every parameter and buffer, read without restoring lean convolution weights
    (ldm.models.conv: a plain dict read, not the module's restoring one)."""
    for prefix, m in module.named_modules():
        for table in (m._parameters, m._buffers):
            for name, p in dict.items(table):
                if p is not None:
                    yield f"{prefix}.{name}", p


def _restore_released(module: nn.Module) -> None:
    """Give lean convolutions their plain weights back (ldm.models.conv) before the weights are read whole: a
    digest or a tracer reads the parameter dicts directly, where a released weight is an empty tensor."""
    from ldm.models.conv import Conv2d

    for layer in module.modules():
        if isinstance(layer, Conv2d):
            layer._restore()


def weights_state(module: nn.Module) -> tuple:
    """Cheap identity of the module's current weights: (id, storage, in-place version) of each tensor. LoRAs
    write into the weights in place, which bumps the version (ldm.checkpoints.adapters.patches)."""
    return tuple((id(p), p.data_ptr(), p._version) for _, p in _parameters(module))


def weights_digest(module: nn.Module) -> str:
    """BLAKE2 digest of every parameter's and buffer's name, dtype, shape and bytes. Weights that are views of
    a mapped checkpoint file are paged out again once read (ldm.pages), so hashing leaves none resident."""
    _restore_released(module)
    h = hashlib.blake2b(digest_size=20)
    for name, p in _parameters(module):
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
        if pages.file_mapped(p):
            pages.page_out(p)
    return h.hexdigest()



class OpenVINONetwork(nn.Module):
    """`module(*rows)` through OpenVINO: forward(x, *args, **kwargs) with tensors whose first dimension is the
    batch; each row runs through one compiled batch-1 graph (see the module docstring). `module` itself takes
    and returns tensors in `dtype`; the graph's interface is float32 (numpy has no bfloat16)."""

    extra_config: dict[str, str] = {}      # more OpenVINO compile options (a profiler sets PERF_COUNT here)

    def __init__(self, module: nn.Module, dtype: torch.dtype, *, name: str, threads: int | None = None,
                 streams: int | None = None):
        super().__init__()
        self.module, self.dtype, self.name = module, dtype, name
        self.threads = threads or torch.get_num_threads()
        self.streams = streams or (2 if self.threads >= 2 else 1)
        self.precision = "bf16" if dtype == torch.bfloat16 else "f32"
        self._compiled: dict[tuple, list] = {}      # input signature -> infer requests, one per stream
        self._pending: dict[tuple, Future] = {}     # signature -> requests being built in the background
        self._state = None
        self._digest: str | None = None
        self.failed = False

    # ---------------------------------------------------------------- weights
    def refresh(self) -> None:
        """Forget compiled graphs when the module's weights changed since they were built (a LoRA loaded or
        removed, new weights assigned). Cheap; the pipeline calls it once per request."""
        state = weights_state(self.module)
        if state != self._state:
            self._compiled.clear()
            self._pending.clear()
            self._state, self._digest = state, None

    def prepare(self, *args, **kwargs) -> None:
        """Build the graph for inputs shaped like these (one row) in a background thread, so that reading and
        compiling it overlap with whatever the caller does next (loading the text encoder, encoding the prompt:
        on the default model that hides ~0.7 s of a cold process). The first call with that signature waits
        for it. Only a graph already in the cache is built this way: tracing a module is not thread-safe (its
        check run differs when another thread runs PyTorch meanwhile), so a conversion always runs in the
        caller's thread, at the first call."""
        self.refresh()
        rows = [_row(v, 0) for v in args]
        krows = {k: _row(v, 0) for k, v in kwargs.items()}
        signature = _signature(rows, krows)
        if signature in self._compiled or signature in self._pending or not self._folder(signature).is_dir():
            return
        self._pending[signature] = _background().submit(self._build, signature, rows, krows, convert=False)

    def _weights_digest(self) -> str:
        if self._digest is None:
            self._digest = weights_digest(self.module)
        return self._digest

    # ---------------------------------------------------------------- conversion
    def _key(self, signature) -> str:
        config = getattr(self.module, "config", None)
        facts = {"name": self.name, "class": type(self.module).__qualname__, "config": repr(config),
                 "signature": repr(signature), "weights": self._weights_digest(), **_versions()}
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]

    def _convert(self, args, kwargs):
        """ov.convert_model over a TorchScript trace of the module (OpenVINO's PyTorch frontend; its graphs of
        ldm's U-Net ran 1.3x faster than those of the torch.export route, measured in docs/benchmarks.md)."""
        import openvino as ov

        names = list(kwargs)
        positional = len(args)
        module, dtype = self.module, self.dtype

        class Float32Interface(nn.Module):     # positional float32 in and out; the network in its dtype inside
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, *inputs):
                cast = [v.to(dtype) if v.is_floating_point() else v for v in inputs]
                return self.inner(*cast[:positional], **dict(zip(names, cast[positional:]))).float()

        from ldm.models.conv import Conv2d, pack_for_inference, unpack
        from ldm.models.upsample import Upsample

        # The tracer checks its graph against a second, eager run, in which a lean convolution would pack and
        # release the very weight the graph holds, and any other would keep a packed copy beside its weight (on
        # SD 1.5 in bf16: 1.6 GB held for nothing): convert with plain weights and packing off, lean afterwards.
        lean = [layer for layer in module.modules() if isinstance(layer, Conv2d) and layer.__dict__.get("_lean")]
        unpack(module)
        convs = [layer for layer in module.modules() if isinstance(layer, Conv2d)]
        for layer in convs:
            layer.prepack = False           # an instance attribute over the class's switch
        for layer in module.modules():
            if isinstance(layer, Upsample) and layer.subpixel:
                layer._folded()     # folded before tracing: the graph holds the kernel as a constant
        # weights that are views of the checkpoint file are handed back while the tracer reads them (ldm.pages)
        checkpoint = pages.mapped_files(p for _, p in _parameters(module))
        try:
            with torch.no_grad(), pages.released_while(*checkpoint):
                return ov.convert_model(Float32Interface().eval(), example_input=tuple([*args, *kwargs.values()]))
        finally:
            for layer in convs:
                del layer.prepack
            for layer in lean:
                pack_for_inference(layer)

    def _folder(self, signature) -> Path:
        return cache_dir() / f"{self.name}-{self._key(signature)}"

    def _load_or_convert(self, signature, args, kwargs):
        """(graph, its weights file): the cached graph of this signature, converted and saved first if there is
        none, read back from the file so that its weights are mapped; (the converted graph, None) where the
        cache cannot be written."""
        import openvino as ov

        folder = self._folder(signature)
        xml = folder / "model.xml"
        if xml.is_file():
            try:
                return _core().read_model(str(xml)), xml.with_suffix(".bin")
            except Exception as error:      # a truncated or corrupt entry: rebuilt, never trusted
                warnings.warn(f"OpenVINO cache entry {folder} does not load ({error}); rebuilding it",
                              RuntimeWarning, stacklevel=4)
                shutil.rmtree(folder, ignore_errors=True)
        model = self._convert(args, kwargs)
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            try:
                tmp.rename(folder)          # atomic; another process may have won the race, which is fine
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as error:            # a read-only home: run uncached
            warnings.warn(f"cannot write the OpenVINO cache under {folder.parent} ({error}); converting every "
                          "time", RuntimeWarning, stacklevel=4)
            return model, None
        del model                           # read back: mapped from the file, its pages can be handed back
        return _core().read_model(str(xml)), xml.with_suffix(".bin")

    def _requests(self, signature, args, kwargs) -> list:
        requests = self._compiled.get(signature)
        if requests is None:
            pending = self._pending.pop(signature, None)
            try:
                requests = pending.result() if pending is not None else None
            except Exception:           # e.g. the cache entry went bad meanwhile: build it here, as if unprepared
                requests = None
            requests = requests or self._build(signature, args, kwargs)
            self._compiled[signature] = requests
        return requests

    def _build(self, signature, args, kwargs, convert: bool = True) -> list:
        if convert:
            with torch.no_grad():
                model, weights = self._load_or_convert(signature, args, kwargs)
        else:
            xml = self._folder(signature) / "model.xml"
            model, weights = _core().read_model(str(xml)), xml.with_suffix(".bin")
        # the converted graph keeps its dimensions open; static shapes let the CPU plugin plan every layer
        shapes = [tuple(v.shape) for v in (*args, *kwargs.values())]
        model.reshape({port: shape for port, shape in zip(model.inputs, shapes)})
        streams = self.streams if math.prod(shapes[0][2:]) < ROW_STREAMS_MAX_POSITIONS else 1
        config = {"INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": str(self.threads),
                  "NUM_STREAMS": str(streams), "PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY",
                  **self.extra_config}
        self._page_out_weights()
        # OpenVINO maps the graph file's weights: their pages are handed back while it packs them into its own
        # layout (ldm.pages), so the process never holds the weights twice
        with pages.released_while(weights) if weights is not None else contextlib.nullcontext():
            compiled = _core().compile_model(model, "CPU", config)
            del model
        return [compiled.create_infer_request() for _ in range(streams)]

    def _page_out_weights(self) -> None:
        """Hand the pages of weights that are views of a mapped checkpoint file back to the kernel before
        OpenVINO makes its own packed copy: the PyTorch module is only read again for a new conversion or the
        eager fallback, and clean file pages come back from the file when read (ldm.pages.page_out)."""
        for _, p in _parameters(self.module):
            if pages.file_mapped(p):
                pages.page_out(p)

    # ---------------------------------------------------------------- running
    def _eager(self, *args, **kwargs):
        """The PyTorch module itself, with all the threads (the sampling loop keeps PyTorch at one)."""
        with _torch_threads(max(self.threads, torch.get_num_threads())):
            return self.module(*args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        inputs = [x, *args, *kwargs.values()]
        if self.failed or torch.is_grad_enabled() or not all(torch.is_tensor(v) for v in inputs) \
                or x.device.type != "cpu":
            return self._eager(x, *args, **kwargs)
        b = x.shape[0]
        args = [a.reshape(-1).expand(b) if a.dim() == 0 or (a.numel() == 1 and b > 1) else a for a in args]
        rows = [[_row(v, i) for v in (x, *args)] for i in range(b)]
        krows = [{k: _row(v, i) for k, v in kwargs.items()} for i in range(b)]
        signature = _signature(rows[0], krows[0])
        try:
            requests = self._requests(signature, rows[0], krows[0])
        except Exception as error:      # an operator OpenVINO cannot take, a broken install: run eager
            self.failed = True
            warnings.warn(f"OpenVINO could not compile the {self.name} ({type(error).__name__}: {error}); running "
                          "it in PyTorch", RuntimeWarning, stacklevel=2)
            return self._eager(x, *args, **kwargs)
        import openvino as ov

        outs: list[torch.Tensor] = []
        for start in range(0, b, len(requests)):
            group = list(zip(requests, range(start, min(start + len(requests), b))))
            for request, i in group:
                # shared memory: the request reads the rows in place (they stay alive until it is waited for)
                for j, v in enumerate([*rows[i], *krows[i].values()]):
                    request.set_input_tensor(j, ov.Tensor(v.numpy(), shared_memory=True))
                request.start_async()
            for request, _ in group:
                request.wait()
                outs.append(torch.from_numpy(request.get_output_tensor(0).data.copy()))
        return torch.cat(outs).to(self.dtype)


def _signature(row: list[torch.Tensor], krow: dict[str, torch.Tensor]) -> tuple:
    return (tuple((tuple(v.shape), v.dtype) for v in row), tuple((k, tuple(v.shape), v.dtype) for k, v in krow.items()))


@functools.cache
def _background() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ldm-openvino")


def _row(v: torch.Tensor, i: int) -> torch.Tensor:
    """Row i of a batch as a contiguous batch of one (float32 for floating tensors: the graph's interface)."""
    row = v[i:i + 1]
    return (row.float() if row.is_floating_point() else row).contiguous()


class _Decode(nn.Module):
    """The VAE's latent -> image map (no tiling, no dtype changes: both are settled before export). Only the
    decoder's modules are this module's, so converting it never touches the encoder, which img2img may be
    running meanwhile."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv
        self.__dict__["vae"] = vae          # not a submodule

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae._image(z)


def prepare(pipe) -> None:
    """Start building the graphs of the model's default request (its native size, one 77-token chunk) in the
    background: ``Pipeline`` calls it once loaded, so a cold process reads and compiles them while it encodes
    the prompt. Not for SDXL's extra inputs or the inpainting U-Net (they build at their first call)."""
    if pipe.backend != "openvino" or pipe.conditioner.pooled or pipe.is_inpainting_model:
        return
    side = pipe.defaults.get("size") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    h = w = side // pipe.vae_scale_factor
    x = torch.zeros(1, pipe.latent_channels, h, w)
    context = torch.zeros(1, pipe.conditioner.chunk_length, pipe.conditioner.context_dim)
    pipe._network.prepare(x, torch.zeros(1), context=context)     # as the denoiser calls it
    decoder = vae_runner(pipe)
    if decoder is not None:
        decoder.prepare(x)


@contextlib.contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sampling_threads(pipe):
    """Context for the sampling loop: on the OpenVINO backend PyTorch keeps one thread while it runs. The
    sampler's own arithmetic is a few element-wise ops on small tensors between U-Net calls, and PyTorch's
    OpenMP workers spin-wait after each parallel region, on the very cores OpenVINO's streams are about to
    use: measured on the default model (2 threads), a U-Net pair took 12.1 ms inside the loop against 8.8 ms
    back to back, and 8.8 ms again with this. (The eager fallback gets its threads back.)"""
    if not isinstance(pipe._network, OpenVINONetwork):
        return contextlib.nullcontext()
    return _torch_threads(1)


def unet_runner(pipe) -> nn.Module:
    """The network a pipeline's denoiser calls: the U-Net through OpenVINO (weights checked for changes once per
    request), or the U-Net itself on the PyTorch backend."""
    network = pipe._network
    if isinstance(network, OpenVINONetwork):
        network.refresh()
    return network


def vae_runner(pipe) -> OpenVINONetwork | None:
    """The pipeline's VAE decoder through OpenVINO for an untiled decode in ``pipe.vae_dtype``, or None where
    it runs in PyTorch (another backend, tiling on, a VAE without the AutoencoderKL decoder)."""
    vae = pipe.vae
    if pipe.backend != "openvino" or getattr(vae, "tiling", True) or not hasattr(vae, "_image"):
        return None
    runner = pipe.__dict__.get("_vae_runner")
    if runner is None or runner.module.vae is not vae or runner.dtype != pipe.vae_dtype or runner.failed:
        vae.set_decoder_dtype(pipe.vae_dtype)
        # one image per decode (batch invariance), so one stream with every thread
        runner = OpenVINONetwork(_Decode(vae), pipe.vae_dtype, name="vae-decoder", streams=1)
        pipe.__dict__["_vae_runner"] = runner
    runner.refresh()
    return runner
