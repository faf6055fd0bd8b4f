"""Shared pieces of the ldm-vs-diffusers benchmarks (scripts/bench_pipeline.py, scripts/bench_train.py).

Both libraries are measured on the *same* random weights: the architecture is built with diffusers /
transformers classes (random init, seeded), saved once as a diffusers folder in a temporary directory, and each
library loads that folder. Every measurement runs in its own subprocess so that peak RSS (VmHWM, which can
only grow) belongs to one library and one setting.
"""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photograph of an astronaut riding a horse"

# SD 1.5's architecture (runwayml/stable-diffusion-v1-5 unet/vae/text_encoder config.json values).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=[128, 256, 512, 512], norm_num_groups=32,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
# SD 1.x's training schedule (scheduler_config.json of SD 1.5).
SD15_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                     timestep_spacing="leading", prediction_type="epsilon")


# A tiny model with SD's shapes where they matter to a VAE swap (4 latent channels, downscale 8): smoke tests only.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                 cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
                block_out_channels=[8, 8, 16, 16], norm_num_groups=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu")


def default_configs() -> tuple[dict, dict, dict, dict]:
    """(unet, vae, text, schedule) of the shipped default model, from configs/default.yaml's model section."""
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    m, res = cfg["model"], cfg["data"]["resolution"]
    vae = dict(m["vae"], in_channels=3, out_channels=3, sample_size=res,
               down_block_types=["DownEncoderBlock2D"] * len(m["vae"]["block_out_channels"]),
               up_block_types=["UpDecoderBlock2D"] * len(m["vae"]["block_out_channels"]))
    downscale = 2 ** (len(vae["block_out_channels"]) - 1)
    text = {k: v for k, v in m["text_encoder"].items() if v is not None}
    text.setdefault("max_position_embeddings", 77)
    text.update(vocab_size=49408, hidden_act="quick_gelu")
    text.setdefault("projection_dim", text["hidden_size"])
    unet = dict(m["unet"], sample_size=res // downscale, in_channels=4, out_channels=4,
                cross_attention_dim=text["hidden_size"])
    schedule = dict(beta_start=0.00085, beta_end=0.012, **m["schedule"], prediction_type=cfg["prediction_type"])
    return unet, vae, text, schedule


def configs(model: str) -> tuple[dict, dict, dict, dict]:
    if model == "sd15":
        return SD15_UNET, SD15_VAE, SD15_TEXT, SD15_SCHEDULE
    if model == "default":
        return default_configs()
    if model == "tiny":
        return TINY_UNET, TINY_VAE, TINY_TEXT, SD15_SCHEDULE
    raise ValueError(f"unknown model {model!r} (sd15, default or tiny; sdxl: make_sdxl_folder)")


def make_folder(model: str, folder: Path, seed: int = 0, reuse: bool = False, dtype=torch.float32) -> Path:
    """Build ``model`` ("default", "sd15", "tiny" or "sdxl") with random (seeded) weights in diffusers/transformers
    classes; save it as a folder. With ``reuse``, a folder already complete (model_index.json is written last)
    is taken as it is."""
    if reuse and (Path(folder) / "model_index.json").is_file():
        return Path(folder)
    if model == "sdxl":
        return make_sdxl_folder(Path(folder), seed, dtype)
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm.assets import TOKENIZER_DIR

    unet_cfg, vae_cfg, text_cfg, schedule = configs(model)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg), text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token="<|endoftext|>",
                                                model_max_length=77),
        unet=UNet2DConditionModel(**unet_cfg), scheduler=DPMSolverMultistepScheduler(**schedule),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def make_sdxl_folder(folder: Path, seed: int = 0, dtype=torch.float32) -> Path:
    """SDXL base's architecture (tests/sdxl_reference.py: the released config.json values) with random weights,
    saved as a StableDiffusionXLPipeline folder one component at a time (each is freed before the next is
    built: 3.5 B parameters, 14 GB in float32), weights stored as ``dtype``."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ldm.assets import TOKENIZER_DIR
    sys.path.insert(0, str(ROOT / "tests"))
    from sdxl_reference import BIG_G, CLIP_L, SDXL_BASE_UNET, SDXL_VAE

    torch.manual_seed(seed)
    parts = (("unet", lambda: UNet2DConditionModel(**SDXL_BASE_UNET)), ("vae", lambda: AutoencoderKL(**SDXL_VAE)),
             ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L))),
             ("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G))))
    for name, make in parts:
        make().to(dtype).save_pretrained(folder / name, safe_serialization=True, max_shard_size="50GB")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):    # SDXL's two tokenizers' padding
        CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad, model_max_length=77).save_pretrained(
            folder / name)
    # SDXL base's scheduler_config.json (EulerDiscreteScheduler there; the same training schedule)
    DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                steps_offset=1, timestep_spacing="leading").save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "image_encoder": [None, None],
             "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))     # last: marks the folder complete
    return folder


def load_pipeline(lib: str, folder, *, device: str = "cpu", batch_invariant: bool = True, lean: bool = True,
                  prepack: bool = True, dtype: str | None = None, vae_dtype: str | None = None,
                  micro_batch: int | None = None, compile: bool = False, backend: str | None = None):
    """(pipe, generate) for ``lib`` "ldm" (ldm.Pipeline) or "diffusers" (the folder's pipeline class,
    StableDiffusionPipeline or StableDiffusionXLPipeline, in float32, with DPMSolverMultistepScheduler) on ``folder``; ``generate(prompts, steps, size)`` samples both alike:
    DPM-Solver++ 2M, guidance 7.5, seed 0, float arrays out. ``dtype``, ``vae_dtype``, ``micro_batch``: ldm's
    options of those names (None: its defaults); ``compile``: ldm's ``compile=True`` (torch.compile of the U-Net);
    ``backend``: ldm's ``backend=`` ("torch", "openvino"; None: its default, "auto")."""
    if lib == "ldm":
        import ldm
        from ldm.models.conv import Conv2d

        Conv2d.prepack = prepack
        pipe = ldm.Pipeline.from_pretrained(folder, device=device, lean=lean, dtype=dtype, vae_dtype=vae_dtype,
                                            compile=compile, backend=backend)
        pipe.batch_invariant = batch_invariant
        if micro_batch is not None:
            pipe.micro_batch = micro_batch

        def generate(prompts, steps, size):
            return pipe(prompts, steps=steps, guidance=7.5, sampler="dpmpp_2m", height=size, width=size, seed=0,
                        progress=False, output_type="np")
        return pipe, generate
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    extra = {} if (Path(folder) / "text_encoder_2").is_dir() else dict(safety_checker=None,
                                                                         requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, **extra)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def generate(prompts, steps, size):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    return pipe, generate


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB: VmHWM of /proc/self/status on Linux. Not ru_maxrss: Linux
    carries it over exec from the address space it replaces, so a child started by a parent that once held
    the whole model (building the weights folder) would report the parent's peak, not its own."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def run_child(script: Path, args: list[str], python: Path | str | None = None) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter (``python``: another venv's; default this one); it
    prints one JSON line last."""
    proc = subprocess.run([str(python or sys.executable), str(script), "--child", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(values) -> float:
    return statistics.median(values)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_name() -> str:
    """The CPU's model name and whether it has native bf16 matrix units (every benchmark table names its CPU)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                "unknown CPU")
    flags = [f for f in ("amx_bf16", "avx512_bf16") if f in text.split()]
    return f"{name} ({', '.join(flags) if flags else 'no native bf16'})"
