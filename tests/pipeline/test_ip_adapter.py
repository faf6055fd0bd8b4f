"""IP-Adapter through the Pipeline: ldm draws what diffusers' load_ip_adapter + set_ip_adapter_scale +
ip_adapter_image draw (tiny random models, DDIM, eta 0, the same latents, within 2/255), for the base projection,
Plus (Resampler) and Full-face (MLP), from flat .safetensors and nested .bin files; with a ControlNet beside it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from control_fixtures import tiny_controlnet
from ldm import Control, Pipeline
from ldm.checkpoints import CheckpointError
from ldm.models.ip_adapter import IPAdapter, IPAdapterConfig, cross_attention_layers
from tiny_models import perturb, save_tiny_pipeline

PROMPT = "a turtle"
H, W = 24, 32
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8, projection_dim=24)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    tmp = tmp_path_factory.mktemp("ip")
    folder = save_tiny_pipeline(tmp / "sd1", "sd1", seed=3)
    torch.manual_seed(0)
    encoder = perturb(CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)), 1).eval()
    encoder.save_pretrained(tmp / "image_encoder")
    pipe = Pipeline.from_pretrained(folder)
    layers = tuple((a.to_k.in_features, a.to_k.out_features) for a in (p.attn2 for p, _ in
                                                                          cross_attention_layers(pipe.unet)))
    configs = {"base": IPAdapterConfig("base", ENCODER["projection_dim"], 64, 4, layers),
               "plus": IPAdapterConfig("plus", ENCODER["hidden_size"], 64, 4, layers, depth=4, width=64, ff_mult=4),
               "full": IPAdapterConfig("full", ENCODER["hidden_size"], 64, 0, layers)}
    files = {}
    for kind, cfg in configs.items():
        torch.manual_seed(2)
        state = {k: v.contiguous() for k, v in perturb(IPAdapter(cfg), 3, 0.2).state_dict().items()}
        from safetensors.torch import save_file

        save_file(state, str(tmp / f"ip-{kind}.safetensors"))
        nested = {"image_proj": {}, "ip_adapter": {}}
        for k, v in state.items():
            outer, inner = k.split(".", 1)
            nested[outer][inner] = v
        torch.save(nested, tmp / f"ip-{kind}.bin")
        files[kind] = tmp / f"ip-{kind}"

    def diffusers_pipe(kind):
        from transformers import CLIPImageProcessor

        theirs = StableDiffusionPipeline.from_pretrained(folder)
        theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
        theirs.set_progress_bar_config(disable=True)
        theirs.load_ip_adapter(str(tmp), subfolder="", weight_name=f"ip-{kind}.bin", image_encoder_folder=None)
        theirs.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(tmp / "image_encoder"),
                                feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
        return theirs

    return dict(tmp=tmp, folder=folder, pipe=pipe, files=files, diffusers_pipe=diffusers_pipe)


def reference(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def latents() -> torch.Tensor:
    return torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))


def ours(pipe, control, **options):
    return pipe(PROMPT, num_images_per_prompt=2, steps=6, guidance=7.5, height=H, width=W, sampler="ddim",
                latents=latents(), output_type="np", progress=False, control=control, **options)


@pytest.mark.parametrize("kind, suffix", [("base", ".bin"), ("plus", ".safetensors"), ("full", ".bin")])
def test_ip_adapter_matches_diffusers(setup, kind, suffix):
    theirs = setup["diffusers_pipe"](kind)
    theirs.set_ip_adapter_scale(0.6)
    image = reference()
    expected = theirs(PROMPT, ip_adapter_image=image, num_images_per_prompt=2, num_inference_steps=6,
                      guidance_scale=7.5, latents=latents(), height=H, width=W, output_type="np").images
    pipe = setup["pipe"]
    unit = pipe.load_control(str(setup["files"][kind]) + suffix, image_encoder=setup["tmp"] / "image_encoder")
    assert unit.kind == "IP-Adapter" and unit.model.config.projection == kind
    got = ours(pipe, Control(unit, image, scale=0.6))
    assert np.abs(got - expected).max() <= 2 / 255
    plain = ours(pipe, None)
    assert np.abs(plain - expected).max() > 0.02
    np.testing.assert_array_equal(ours(pipe, None), plain)    # the U-Net is itself again after the request


def test_ip_adapter_beside_a_controlnet_keeps_seeds_and_batches(setup):
    from diffusers import StableDiffusionPipeline

    pipe = setup["pipe"]
    net = tiny_controlnet(StableDiffusionPipeline.from_pretrained(setup["folder"]).unet)
    net.save_pretrained(setup["tmp"] / "cn")
    control = [Control(pipe.load_control(setup["tmp"] / "cn"), reference(1), 0.8),
               Control(pipe.load_control(setup["files"]["base"].with_suffix(".bin"),
                                         image_encoder=setup["tmp"] / "image_encoder"), reference(2), 0.7, end=0.5)]
    run = dict(steps=4, height=16, width=16, progress=False, output_type="np", control=control)
    batch = pipe(PROMPT, seed=[3, 4, 5], num_images_per_prompt=3, **run)
    alone = pipe(PROMPT, seed=4, **run)
    np.testing.assert_array_equal(batch[1], alone[0])


def test_image_encoder_from_a_single_file(setup, tmp_path):
    """A CLIP vision model's weights alone (as ComfyUI keeps them): the config comes from the shapes (64 channels a
    head below 1024 wide, GELU) and the tokens equal those of the same model loaded from its folder."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ldm.checkpoints.ip_adapter import load_image_encoder
    from ldm.pipeline.control import ip_tokens

    torch.manual_seed(4)
    config = CLIPVisionConfig(**{**ENCODER, "hidden_size": 64, "num_attention_heads": 1}, hidden_act="gelu")
    encoder = perturb(CLIPVisionModelWithProjection(config), 5).eval()
    encoder.save_pretrained(tmp_path / "folder")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "clip_vision.safetensors"))
    from_file = load_image_encoder(tmp_path / "clip_vision.safetensors")
    assert from_file[0].config.num_attention_heads == 1 and from_file[0].config.image_size == 32
    for kind in ("base", "full"):
        cfg = IPAdapterConfig(kind, 24 if kind == "base" else 64, 64, 4 if kind == "base" else 0, ((64, 32),))
        units = [type("Unit", (), {"image_encoder": enc, "model": IPAdapter(cfg).eval()})()
                 for enc in (from_file, load_image_encoder(tmp_path / "folder"))]
        units[1].model.load_state_dict(units[0].model.state_dict())
        with torch.no_grad():
            a, b = (ip_tokens(u, reference(), "cpu", torch.float32) for u in units)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(CheckpointError, match="not a CLIP vision model with projection"):
        load_image_encoder(setup["files"]["base"].with_suffix(".safetensors"))


def test_ip_adapter_needs_its_encoder_and_a_matching_model(setup, tmp_path):
    pipe = setup["pipe"]
    with pytest.raises(ValueError, match="needs its image encoder"):
        pipe.load_control(setup["files"]["base"].with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="not a transformers CLIPVisionModelWithProjection folder"):
        pipe.load_control(setup["files"]["base"].with_suffix(".bin"), image_encoder=tmp_path)
    from safetensors.torch import save_file

    save_file({"image_proj.proj.weight": torch.zeros(4 * 64, 24), "image_proj.norm.weight": torch.zeros(64),
               "image_proj.norm.bias": torch.zeros(64), "image_proj.proj.bias": torch.zeros(256),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 64), "ip_adapter.1.to_v_ip.weight": torch.zeros(32, 64)},
              str(tmp_path / "ip-other.safetensors"))
    with pytest.raises(CheckpointError, match="ip-other.safetensors: an IP-Adapter for a U-Net with 1 cross-attention"):
        pipe.load_control(tmp_path / "ip-other.safetensors", image_encoder=setup["tmp"] / "image_encoder")


def test_ip_adapter_with_a_prompt_lora(setup):
    """A <lora:...> tag in the prompt patches the U-Net's layers by name while the IP layers are in place."""
    from adapter_files import diffusers_pipeline, peft_lora_file

    loras = setup["tmp"] / "loras"
    if not (loras / "style.safetensors").exists():
        lora, _ = peft_lora_file(diffusers_pipeline(setup["folder"]), loras)
        lora.rename(loras / "style.safetensors")
    pipe = Pipeline.from_pretrained(setup["folder"], lora_dir=loras)
    unit = pipe.load_control(setup["files"]["base"].with_suffix(".bin"), image_encoder=setup["tmp"] / "image_encoder")
    control = Control(unit, reference(), 0.6)
    tagged = pipe(f"{PROMPT} <lora:style:0.8>", steps=3, height=16, width=16, seed=1, output_type="np",
                  progress=False, control=control)
    handle = pipe.load_lora(loras / "style.safetensors", 0.8)
    loaded = pipe(PROMPT, steps=3, height=16, width=16, seed=1, output_type="np", progress=False, control=control)
    handle.remove()
    np.testing.assert_allclose(tagged, loaded, atol=1e-5)
