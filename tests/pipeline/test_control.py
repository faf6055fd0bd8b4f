"""ControlNet and T2I-Adapter through the Pipeline: parity with diffusers' StableDiffusionControlNetPipeline and
StableDiffusionAdapterPipeline on tiny random models (DDIM, eta 0, the same latents, within 2/255), the original
file layouts, per-image seeds and batch invariance, and the checks on Control's fields."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from control_fixtures import tiny_controlnet, tiny_t2i_adapter, write_original_controlnet, write_tencentarc_adapter
from ldm import Control, Pipeline
from ldm.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from tiny_models import save_tiny_pipeline

PROMPTS = ["a turtle", "a red apple"]
H, W = 24, 32
RUN = dict(steps=8, guidance=7.5, height=H, width=W)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SD 1.x folder, its diffusers pipeline, two ControlNets and a T2I-Adapter (diffusers folders)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tmp = tmp_path_factory.mktemp("control")
    folder = save_tiny_pipeline(tmp / "sd1", "sd1", seed=3)
    sd = StableDiffusionPipeline.from_pretrained(folder)
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    nets = [tiny_controlnet(sd.unet, seed=5 + i) for i in range(2)]
    adapter = tiny_t2i_adapter(sd.unet)
    for i, net in enumerate(nets):
        net.save_pretrained(tmp / f"cn{i}")
    adapter.save_pretrained(tmp / "t2i")
    return dict(tmp=tmp, folder=folder, sd=sd, nets=nets, adapter=adapter, pipe=Pipeline.from_pretrained(folder))


def edges(seed: int = 0, size=(40, 30)) -> Image.Image:
    """A control image of another size than the request (so it is resized, as diffusers does)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) > 0.7).astype(np.uint8) * 255)


def latents(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))


def ours(pipe, control, **options):
    return pipe(PROMPTS, sampler="ddim", latents=latents(), output_type="np", progress=False, control=control,
                **{**RUN, **options})


def controlnet_pipeline(models, controlnet):
    from diffusers import StableDiffusionControlNetPipeline

    theirs = StableDiffusionControlNetPipeline(**models["sd"].components, controlnet=controlnet)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def diffusers_run(theirs, **options):
    return theirs(PROMPTS, num_inference_steps=RUN["steps"], guidance_scale=RUN["guidance"], latents=latents(),
                  height=H, width=W, output_type="np", **options).images


def test_controlnet_folder_matches_diffusers(models):
    pipe = models["pipe"]
    unit = pipe.load_control(models["tmp"] / "cn0")
    image = edges()
    expected = diffusers_run(controlnet_pipeline(models, models["nets"][0]), image=image,
                             controlnet_conditioning_scale=0.8, control_guidance_start=0.1, control_guidance_end=0.8)
    got = ours(pipe, [Control(unit, image, scale=0.8, start=0.1, end=0.8)])
    plain = ours(pipe, None)
    assert np.abs(got - expected).max() <= 2 / 255
    assert np.abs(plain - expected).max() > 0.03     # the ControlNet does change the image


def test_guess_mode_matches_diffusers_and_a1111_modes(models):
    pipe = models["pipe"]
    unit = pipe.load_control(models["tmp"] / "cn0")
    image = edges()
    expected = diffusers_run(controlnet_pipeline(models, models["nets"][0]), image=image,
                             controlnet_conditioning_scale=1.5, guess_mode=True)
    got = ours(pipe, Control(unit, image, scale=1.5, guess=True))
    assert np.abs(got - expected).max() <= 2 / 255
    assert np.abs(ours(pipe, Control(unit, image, scale=1.5)) - expected).max() > 0.01
    # A1111's modes: "prompt" weights the residuals down toward the shallow levels; "control" also leaves the
    # unconditional branch without control, which without classifier-free guidance is the same thing
    images = {mode: ours(pipe, Control(unit, image, mode=mode)) for mode in ("balanced", "prompt", "control")}
    assert np.abs(images["balanced"] - images["prompt"]).max() > 0.01
    assert np.abs(images["prompt"] - images["control"]).max() > 0.01
    no_cfg = [ours(pipe, Control(unit, image, mode=mode), guidance=1.0) for mode in ("prompt", 2)]
    np.testing.assert_array_equal(*no_cfg)


def test_two_controlnets_with_their_own_scales_and_windows_match_diffusers(models):
    from diffusers import MultiControlNetModel

    pipe = models["pipe"]
    units = [pipe.load_control(models["tmp"] / f"cn{i}") for i in range(2)]
    images = [edges(1), edges(2, size=(32, 24))]
    expected = diffusers_run(controlnet_pipeline(models, MultiControlNetModel(models["nets"])), image=images,
                             controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.0, 0.25],
                             control_guidance_end=[0.5, 1.0])
    got = ours(pipe, [Control(units[0], images[0], 0.7, 0.0, 0.5), Control(units[1], images[1], 1.3, 0.25, 1.0)])
    assert np.abs(got - expected).max() <= 2 / 255
    one = ours(pipe, [Control(units[0], images[0], 0.7, 0.0, 0.5)])
    assert np.abs(one - got).max() > 0.03


@pytest.mark.parametrize("suffix, prefix", [(".safetensors", "control_model."), (".pth", "")])
def test_controlnet_in_the_original_layout(models, suffix, prefix):
    """lllyasviel's layout (under control_model., or bare), written as the inverse of diffusers' conversion: diffusers'
    from_single_file reads it back to the same tensors, and ldm draws the same image from it as from the folder."""
    from diffusers import ControlNetModel

    pipe = models["pipe"]
    if suffix == ".safetensors":
        # diffusers' conversion knows only SD's 8x hint embedding (its conv_out at input_hint_block.14), so the
        # round trip through diffusers uses one; ldm reads it to the same tensors too
        standard = tiny_controlnet(models["sd"].unet, 9, conditioning_embedding_out_channels=(16, 32, 96, 256))
        standard.save_pretrained(models["tmp"] / "cn_standard")
        path = write_original_controlnet(standard, models["tmp"] / "control_standard.safetensors", prefix)
        back = ControlNetModel.from_single_file(str(path), config=str(models["tmp"] / "cn_standard"),
                                                local_files_only=True)
        for state in (back.state_dict(), pipe.load_control(path).model.state_dict()):
            assert set(state) == set(standard.state_dict())
            assert all(torch.equal(state[k], v) for k, v in standard.state_dict().items())
    net = models["nets"][0]
    path = write_original_controlnet(net, models["tmp"] / f"control_tiny{suffix}", prefix)
    unit = pipe.load_control(path)
    assert unit.name == "control_tiny" and unit.kind == "ControlNet"
    assert all(torch.equal(unit.model.state_dict()[k], v) for k, v in net.state_dict().items())
    image = edges()
    folder_unit = pipe.load_control(models["tmp"] / "cn0")
    np.testing.assert_array_equal(ours(pipe, Control(unit, image, 0.8)), ours(pipe, Control(folder_unit, image, 0.8)))


def test_t2i_adapter_matches_diffusers(models):
    from diffusers import StableDiffusionAdapterPipeline

    pipe = models["pipe"]
    unit = pipe.load_control(models["tmp"] / "t2i")
    assert unit.kind == "T2I-Adapter"
    theirs = StableDiffusionAdapterPipeline(**{k: v for k, v in models["sd"].components.items()
                                               if k != "image_encoder"}, adapter=models["adapter"])
    theirs.set_progress_bar_config(disable=True)
    image = edges(3)
    # diffusers' SD adapter pipeline acts at every step (its SDXL one has adapter_conditioning_factor = end) and
    # takes one image per prompt
    expected = diffusers_run(theirs, image=[image] * len(PROMPTS), adapter_conditioning_scale=0.9)
    got = ours(pipe, Control(unit, image, scale=0.9))
    assert np.abs(got - expected).max() <= 2 / 255
    assert np.abs(ours(pipe, None) - expected).max() > 0.03


@pytest.mark.parametrize("adapter_type", ["full_adapter", "light_adapter"])
def test_t2i_adapter_in_tencentarc_layout(models, adapter_type):
    pipe = models["pipe"]
    adapter = models["adapter"] if adapter_type == "full_adapter" else tiny_t2i_adapter(models["sd"].unet, 7,
                                                                                         adapter_type)
    path = write_tencentarc_adapter(adapter, models["tmp"] / f"t2iadapter_{adapter_type}.pth")
    unit = pipe.load_control(path)
    assert unit.model.config.adapter_type == adapter_type
    state = unit.model.state_dict()
    assert set(state) == set(adapter.state_dict())
    assert all(torch.equal(state[k], v) for k, v in adapter.state_dict().items())


def test_control_keeps_per_image_seeds_and_batch_invariance(models):
    pipe = models["pipe"]
    units = [pipe.load_control(models["tmp"] / "cn0"), pipe.load_control(models["tmp"] / "t2i")]
    control = [Control(units[0], edges(), 0.8, 0.0, 0.6), Control(units[1], edges(3), 0.5)]
    run = dict(steps=4, height=16, width=16, progress=False, output_type="np", control=control)
    batch = pipe("a turtle", seed=[7, 8, 9], num_images_per_prompt=3, **run)
    alone = pipe("a turtle", seed=8, **run)
    np.testing.assert_array_equal(batch[1], alone[0])
    assert np.abs(batch[1] - batch[0]).max() > 0.01


def test_control_image_as_an_array_and_in_guidance_one(models):
    pipe = models["pipe"]
    unit = pipe.load_control(models["tmp"] / "cn0")
    array = np.asarray(edges(), dtype=np.float32) / 255.0
    as_array = ours(pipe, Control(unit, array), guidance=1.0)
    as_tensor = ours(pipe, Control(unit, torch.from_numpy(array)), guidance=1.0)
    np.testing.assert_array_equal(as_array, as_tensor)
    assert np.abs(as_array - ours(pipe, None, guidance=1.0)).max() > 0.01


@pytest.mark.parametrize("fields, message", [
    (dict(start=0.6, end=0.4), "0 <= start <= end <= 1"),
    (dict(scale=math.nan), "Control.scale must be a finite number"),
    (dict(scale="strong"), "Control.scale must be a finite number"),
    (dict(end=1.5), "0 <= start <= end <= 1"),
    (dict(start=-0.1), "0 <= start <= end <= 1"),
    (dict(mode="louder"), "Control.mode must be 'balanced', 'prompt' or 'control'"),
    (dict(guess="yes"), "Control.guess must be True or False"),
])
def test_bad_control_fields_are_one_clear_error(models, fields, message):
    unit = models["pipe"].load_control(models["tmp"] / "cn0")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Control(unit, edges(), **fields)


def test_bad_control_arguments(models):
    pipe = models["pipe"]
    unit = pipe.load_control(models["tmp"] / "cn0")
    with pytest.raises(ValueError, match="Control.model must be"):
        Control("canny.safetensors", edges())
    with pytest.raises(ValueError, match="control must be a Control"):
        ours(pipe, [unit])
    with pytest.raises(ValueError, match="must hold finite values in"):
        ours(pipe, Control(unit, np.full((8, 8, 3), 2.0, dtype=np.float32)))
    with pytest.raises(ValueError, match="does not exist"):
        ours(pipe, Control(unit, models["tmp"] / "missing.png"))
    with pytest.raises(ValueError, match="takes no image_encoder"):
        pipe.load_control(models["tmp"] / "cn0", image_encoder="clip/")
    with pytest.raises(ValueError, match=r"control\[0\]: .* does not fit this pipeline's U-Net"):
        ours(pipe, Control(T2IAdapter(T2IAdapterConfig(channels=(32, 32), downscale_factor=2)), edges()))
    with pytest.raises(ValueError, match="Control.guess applies to ControlNets only"):
        Control(pipe.load_control(models["tmp"] / "t2i"), edges(), guess=True)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL base folder and diffusers' pipeline over it, with a ControlNet and an SDXL T2I-Adapter."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, T2IAdapter

    from tiny_models import perturb
    from tiny_sdxl import save_tiny_sdxl

    tmp = tmp_path_factory.mktemp("control_xl")
    folder = save_tiny_sdxl(tmp / "base", seed=3)
    xl = StableDiffusionXLPipeline.from_pretrained(folder)
    xl.scheduler = DDIMScheduler.from_config(xl.scheduler.config)
    net = tiny_controlnet(xl.unet, seed=11)
    net.save_pretrained(tmp / "cn")
    torch.manual_seed(12)
    widths = list(xl.unet.config.block_out_channels)
    adapter = perturb(T2IAdapter(in_channels=3, channels=[*widths, widths[-1], widths[-1]], num_res_blocks=2,
                                 downscale_factor=4, adapter_type="full_adapter_xl"), 12, 0.05).eval()
    adapter.save_pretrained(tmp / "t2i")
    return dict(tmp=tmp, folder=folder, xl=xl, net=net, adapter=adapter, pipe=Pipeline.from_pretrained(folder))


def test_sdxl_controlnet_and_adapter_match_diffusers(sdxl):
    from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline

    pipe, image = sdxl["pipe"], edges(4)
    run = dict(num_inference_steps=RUN["steps"], guidance_scale=5.0, latents=latents(), height=H, width=W,
               output_type="np")
    theirs = StableDiffusionXLControlNetPipeline(**sdxl["xl"].components, controlnet=sdxl["net"])
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(PROMPTS, image=image, controlnet_conditioning_scale=0.9, control_guidance_end=0.75,
                      **run).images
    unit = pipe.load_control(sdxl["tmp"] / "cn")
    got = ours(pipe, Control(unit, image, scale=0.9, end=0.75), guidance=5.0)
    assert np.abs(got - expected).max() <= 2 / 255
    plain = ours(pipe, None, guidance=5.0)
    assert np.abs(plain - expected).max() > 0.03

    components = {k: v for k, v in sdxl["xl"].components.items() if k not in ("image_encoder", "feature_extractor")}
    theirs = StableDiffusionXLAdapterPipeline(**components, adapter=sdxl["adapter"])
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(PROMPTS, image=[image] * len(PROMPTS), adapter_conditioning_scale=0.8,
                      adapter_conditioning_factor=0.5, **run).images
    unit = pipe.load_control(sdxl["tmp"] / "t2i")
    got = ours(pipe, Control(unit, image, scale=0.8, end=0.5), guidance=5.0)
    assert np.abs(got - expected).max() <= 2 / 255
    assert np.abs(plain - expected).max() > 0.03


def test_control_in_img2img_and_inpaint(models):
    pipe = models["pipe"]
    unit = pipe.load_control(models["tmp"] / "cn0")
    source = Image.fromarray(np.random.default_rng(5).integers(0, 255, (H, W, 3), dtype=np.uint8))
    mask = np.zeros((H, W), dtype=np.float32)
    mask[:, W // 2:] = 1.0
    run = dict(steps=6, seed=[1, 2], num_images_per_prompt=2, output_type="np", progress=False)
    for method, args in (("img2img", (source,)), ("inpaint", (source, Image.fromarray(np.uint8(mask * 255))))):
        plain = getattr(pipe, method)("a turtle", *args, strength=0.7, **run)
        controlled = getattr(pipe, method)("a turtle", *args, strength=0.7, control=Control(unit, edges()), **run)
        alone = getattr(pipe, method)("a turtle", *args, strength=0.7, control=Control(unit, edges()),
                                      **{**run, "seed": 2, "num_images_per_prompt": 1})
        assert np.abs(plain - controlled).max() > 0.01
        np.testing.assert_array_equal(controlled[1], alone[0])   # per-image seeds, batch invariance
    # SD's inpainting ControlNet takes the image with the pixels to repaint at -1
    from ldm.pipeline.control import inpaint_condition

    hint = inpaint_condition(source, Image.fromarray(np.uint8(mask * 255)))
    assert (hint[:, W // 2:] == -1).all() and (hint[:, :W // 2] >= 0).all()
    painted = pipe.inpaint("a turtle", source, Image.fromarray(np.uint8(mask * 255)), control=Control(unit, hint),
                           **run)
    assert np.abs(painted - plain).max() > 0.01
    with pytest.raises(ValueError, match="control must be a Control"):
        pipe.img2img("a turtle", source, control="canny")
    with pytest.raises(TypeError, match="denoise"):
        pipe.denoise(source, control=Control(unit, edges()))


def test_sd2_controlnet_from_an_original_file_matches_diffusers(tmp_path):
    """SD 2.x: linear projections, 64-channel heads (taken from the base U-Net), v-prediction."""
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    folder = save_tiny_pipeline(tmp_path / "sd2", "sd2", seed=4, prediction_type="v_prediction")
    sd = StableDiffusionPipeline.from_pretrained(folder)
    sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    net = tiny_controlnet(sd.unet, seed=13)
    path = write_original_controlnet(net, tmp_path / "control_sd21_tiny.safetensors", prefix="")
    theirs = StableDiffusionControlNetPipeline(**sd.components, controlnet=net)
    theirs.set_progress_bar_config(disable=True)
    image = edges(6)
    expected = diffusers_run(theirs, image=image, controlnet_conditioning_scale=1.2)
    pipe = Pipeline.from_pretrained(folder)
    got = ours(pipe, Control(pipe.load_control(path), image, scale=1.2))
    assert np.abs(got - expected).max() <= 2 / 255
    assert np.abs(ours(pipe, None) - expected).max() > 0.03


def test_png_metadata_records_the_units_as_a1111(models, tmp_path):
    from ldm.pipeline.png_info import info_from_parameters, read_png_info, save_png

    pipe = models["pipe"]
    unit = pipe.load_control(models["tmp"] / "cn0")
    image = pipe("a turtle", steps=2, height=16, width=16, progress=False,
                 control=[Control(unit, edges(), 0.8, 0.1, 0.9, mode="prompt")])[0]
    text = image.info["parameters"]
    assert ('ControlNet 0: "Module: none, Model: cn0, Weight: 0.8, Resize Mode: Just Resize, Guidance Start: 0.1, '
            'Guidance End: 0.9, Control Mode: My prompt is more important"') in text
    assert info_from_parameters(text).extra["ControlNet 0"].startswith("Module: none, Model: cn0")
    save_png(image, tmp_path / "controlled.png")
    assert read_png_info(tmp_path / "controlled.png").extra["ControlNet 0"].startswith("Module: none")


def test_generate_command_takes_control_units(models, tmp_path, capsys):
    from ldm.cli import main

    edges().save(tmp_path / "edges.png")
    unit = f"{models['tmp'] / 'cn0'}:{tmp_path / 'edges.png'}:0.8:0:0.5"
    args = ["generate", "a turtle", "--model", str(models["folder"]), "--seed", "3", "--steps", "3", "--height",
            "16", "--width", "16", "-q", "-o", str(tmp_path / "out.png"), "--control", unit]
    assert main(args) == 0
    out = np.asarray(Image.open(tmp_path / "out.png"))
    expected = models["pipe"]("a turtle", seed=3, steps=3, height=16, width=16, progress=False,
                              control=Control(models["pipe"].load_control(models["tmp"] / "cn0"), edges(), 0.8,
                                              0.0, 0.5))[0]
    np.testing.assert_array_equal(out, np.asarray(expected))
    assert "ControlNet 0: " in Image.open(tmp_path / "out.png").info["parameters"]
    for bad, message in ((f"{models['tmp'] / 'cn0'}", "expected MODEL:IMAGE"),
                         (f"{models['tmp'] / 'cn0'}:{tmp_path / 'edges.png'}:1:0.6:0.2", "0 <= start <= end"),
                         (f"{tmp_path / 'none.safetensors'}:{tmp_path / 'edges.png'}", "does not exist")):
        with pytest.raises(SystemExit) if "does not exist" not in message else contextlib.nullcontext():
            status = main([*args[:-1], bad])
            assert status == 2
        assert message in capsys.readouterr().err
