"""SDXL adapters: LoRAs that patch the U-Net and both text encoders (diffusers/PEFT ``text_encoder_2.``, kohya
``lora_te1_``/``lora_te2_``), SDXL embeddings (``clip_l``/``clip_g``), and A1111's prompt syntax through both
encoders. Images equal diffusers' on the same tiny random SDXL folder within 2/255 (DDIM, same latents)."""
import numpy as np
import pytest
import torch
from adapter_files import TEXT_TARGETS, UNET_TARGETS, randomize
from safetensors.torch import save_file
from tiny_sdxl import save_tiny_sdxl

from ldm import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["a photo of a red apple", "a blue square"]
SIZE = dict(height=24, width=32)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    return save_tiny_sdxl(tmp_path_factory.mktemp("xl") / "base", seed=7)


def _latents(n=len(PROMPTS)):
    return torch.randn(n, 4, 12, 16, generator=torch.Generator().manual_seed(0))


def _theirs(folder):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _their_images(pipe, prompts=PROMPTS):
    with torch.no_grad():
        return pipe(prompts, num_inference_steps=4, guidance_scale=5.0, latents=_latents(len(prompts)),
                    output_type="np", **SIZE).images


def _our_images(pipe, prompts=PROMPTS, **kwargs):
    return pipe(prompts, steps=4, guidance=5.0, sampler="ddim", latents=_latents(len(prompts)), output_type="np",
                progress=False, **SIZE, **kwargs)


def _peft_state_dicts(pipe, seed=0):
    """PEFT adapters on the U-Net and both text encoders, random factors; their state dicts by model."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8.0, target_modules=UNET_TARGETS))
    for k, encoder in enumerate((pipe.text_encoder, pipe.text_encoder_2)):
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4.0, target_modules=TEXT_TARGETS), encoder)
        randomize([p for n, p in encoder.named_parameters() if "lora_" in n], seed + 1 + k)
    randomize([p for n, p in pipe.unet.named_parameters() if "lora_" in n], seed)
    return {name: get_peft_model_state_dict(getattr(pipe, name)) for name in ("unet", "text_encoder", "text_encoder_2")}


def _reference(folder, lora, scale):
    theirs = _theirs(folder)
    theirs.load_lora_weights(str(lora))
    theirs.fuse_lora(lora_scale=scale)
    return _their_images(theirs)


def test_peft_lora_on_both_text_encoders_matches_diffusers(xl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    sd = _peft_state_dicts(_theirs(xl))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=sd["unet"],
                                                text_encoder_lora_layers=sd["text_encoder"],
                                                text_encoder_2_lora_layers=sd["text_encoder_2"])
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    expected = _reference(xl, lora, 0.8)
    pipe = Pipeline.from_pretrained(xl)
    base = _our_images(pipe)
    handle = pipe.load_lora(lora, scale=0.8)
    ours = _our_images(pipe)
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(ours - base).max() > 0.05
    handle.set_scale(0.0, group="text_encoder_2")          # bigG's part alone changes the image
    assert np.abs(_our_images(pipe) - ours).max() > 0.01
    handle.remove()
    assert np.array_equal(_our_images(pipe), base)


def test_kohya_sdxl_lora_te1_te2_matches_diffusers(xl, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    sd = _peft_state_dicts(_theirs(xl), seed=3)
    kohya = convert_state_dict_to_kohya({f"{m}.{k}": v for m, part in sd.items() for k, v in part.items()})
    assert any(k.startswith("lora_te2_") for k in kohya) and any(k.startswith("lora_te1_") for k in kohya)
    path = tmp_path / "xl_style.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    expected = _reference(xl, path, 0.6)
    pipe = Pipeline.from_pretrained(xl)
    handle = pipe.load_lora(path, scale=0.6)
    assert handle.format == "kohya/A1111"
    assert np.abs(_our_images(pipe) - expected).max() <= 2 / 255


def test_sdxl_embedding_clip_l_clip_g_matches_diffusers(xl, tmp_path):
    gen = torch.Generator().manual_seed(4)
    vectors = {"clip_l": torch.randn(2, 64, generator=gen) * 0.5, "clip_g": torch.randn(2, 128, generator=gen) * 0.5}
    path = tmp_path / "xlstyle.safetensors"
    save_file(vectors, str(path))
    prompts = ["a photo in xlstyle", "xlstyle, a blue square"]
    theirs = _theirs(xl)
    theirs.load_textual_inversion(vectors["clip_l"], token="xlstyle", text_encoder=theirs.text_encoder,
                                  tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(vectors["clip_g"], token="xlstyle", text_encoder=theirs.text_encoder_2,
                                  tokenizer=theirs.tokenizer_2)
    expected = _their_images(theirs, prompts)
    pipe = Pipeline.from_pretrained(xl)
    before = _our_images(pipe, prompts)
    assert pipe.load_textual_inversion(path) == ["xlstyle"]
    ours = _our_images(pipe, prompts)
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(ours - before).max() > 0.02


def test_sd1_embedding_is_refused_on_sdxl_before_anything_changes(xl, tmp_path):
    path = tmp_path / "sd1style.safetensors"
    save_file({"emb_params": torch.randn(1, 64)}, str(path))   # CLIP-L's width only: no vectors for bigG
    pipe = Pipeline.from_pretrained(xl)
    with pytest.raises(ValueError, match="sd1style.safetensors.*width 64.*128"):
        pipe.load_textual_inversion(path)
    assert "sd1style" not in pipe.text_encoder.tokenizer.get_vocab()


def test_sdxl_prompt_syntax_long_prompts_and_plain_prompts(xl):
    pipe = Pipeline.from_pretrained(xl)
    plain = pipe.text_conditions(PROMPTS)
    assert all(torch.equal(plain[k], v) for k, v in _without_emphasis(pipe, PROMPTS).items())
    weighted = pipe.text_conditions(["a photo of a (red:1.4) apple"])
    assert not torch.equal(weighted["context"], plain["context"][:1])
    assert torch.equal(weighted["text_embeds"], plain["text_embeds"][:1])   # pooled: unweighted, as A1111
    long = " ".join(["apple"] * 80) + " BREAK a blue square"
    cond = pipe.text_conditions([long, "a cat"])
    assert cond["context"].shape == (2, 3 * 77, 64 + 128)   # 80 words = 2 chunks, BREAK starts a third
    first = pipe.text_conditions([" ".join(["apple"] * 75)])
    assert torch.allclose(cond["text_embeds"][0], first["text_embeds"][0])   # the first chunk's pooled output
    images = _our_images(pipe, [long, "a cat"], negative_prompt="blurry")
    assert images.shape == (2, 24, 32, 3) and np.isfinite(images).all()


def _without_emphasis(pipe, prompts):
    pipe.emphasis = False
    try:
        return pipe.text_conditions(prompts)
    finally:
        pipe.emphasis = True
