"""The few-step recipes and the newer samplers through the whole pipeline: the same latents (and, for the stochastic
ones, the same generator) give diffusers' StableDiffusionPipeline's images with the matching scheduler."""

import json

import numpy as np
import pytest
import torch

from ldm import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "a turtle playing basketball"


@pytest.fixture(scope="module")
def pipes(sd1_folder):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(sd1_folder)
    theirs.set_progress_bar_config(disable=True)
    # the folder's own scheduler settings; "_use_default_values" would make from_config drop the changes below
    config = {k: v for k, v in theirs.scheduler.config.items() if k != "_use_default_values"}
    return Pipeline.from_pretrained(sd1_folder), theirs, config


# (ldm call, diffusers scheduler class, its config changes, steps, guidance, eta)
CASES = [
    ("lcm", None, "LCMScheduler", {}, 1, 1.5, 0.0),
    ("lcm", None, "LCMScheduler", {}, 4, 1.0, 0.0),
    ("tcd", None, "TCDScheduler", {}, 4, 1.5, 0.0),
    ("tcd", None, "TCDScheduler", {}, 4, 1.0, 0.3),
    ("unipc", None, "UniPCMultistepScheduler", {}, 8, 7.5, 0.0),
    ("lms", None, "LMSDiscreteScheduler", {}, 10, 7.5, 0.0),
    ("lms", "karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}, 15, 7.5,
     0.0),   # (linspace: diffusers starts from latents·σ_max, as ldm does on Karras levels)
    ("euler", "trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, 4, 1.0, 0.0),
]


@pytest.mark.parametrize("sampler,spacing,cls,changes,steps,guidance,eta", CASES)
def test_matches_diffusers(pipes, sampler, spacing, cls, changes, steps, guidance, eta):
    import diffusers

    ours, theirs, config = pipes
    theirs.scheduler = getattr(diffusers, cls).from_config({**config, **changes})
    assert all(theirs.scheduler.config[k] == v for k, v in changes.items())
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = theirs(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=latents, height=16,
                      width=16, output_type="np", eta=eta, generator=torch.Generator().manual_seed(11)).images
    got = ours(PROMPT, steps=steps, guidance=guidance, sampler=sampler, spacing=spacing, eta=eta, seed=11,
               latents=latents, height=16, width=16, output_type="np", progress=False)
    assert np.abs(got - expected).max() <= 2 / 255, np.abs(got - expected).max()


def test_lcm_and_tcd_use_the_lcm_grid_and_record_it(pipes):
    ours = pipes[0]
    seen = []
    images = ours(PROMPT, steps=4, guidance=1.0, sampler="lcm", seed=0, height=16, width=16, progress=False,
                  callback=seen.append)
    grid = ours.schedule.sigmas_for(4, "lcm")
    assert [info["sigma"] for info in seen] == grid[:-1].tolist()
    assert json.loads(images[0].info["ldm"])["spacing"] == "lcm"
    assert "Sampler: LCM" in images[0].info["parameters"]


@pytest.mark.parametrize("spacing", ["sgm_uniform", "simple", "beta", "ays"])
def test_community_spacings_run_and_are_recorded(pipes, spacing):
    ours = pipes[0]
    seen = []
    images = ours(PROMPT, steps=5, sampler="dpmpp_2m", spacing=spacing, seed=0, height=16, width=16,
                  progress=False, callback=seen.append)
    assert [info["sigma"] for info in seen] == ours.schedule.sigmas_for(5, spacing)[:-1].tolist()
    label = {"sgm_uniform": "SGM Uniform", "simple": "Simple", "beta": "Beta", "ays": "Align Your Steps"}[spacing]
    assert f"Schedule type: {label}" in images[0].info["parameters"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="lcm", steps=51), r"lcm spacing has at most 50 steps"),
    (dict(sampler="euler", spacing="lcm", steps=60), r"lcm spacing has at most 50 steps"),
    (dict(sampler="tcd", eta=1.5), r"eta=1.5 is not valid for sampler 'tcd' \(eta in \[0, 1\]"),
    (dict(spacing="ays_sd3"), r"unknown spacing 'ays_sd3'; known spacings: leading, .*beta, ays, ays_sdxl"),
])
def test_bad_few_step_requests_fail_before_any_model_runs(pipes, monkeypatch, kwargs, match):
    ours = pipes[0]

    def forbidden(*args, **kw):
        raise AssertionError("a model ran before the input was checked")

    for module in (ours.unet, ours.vae, ours.text_encoder):
        monkeypatch.setattr(module, "forward", forbidden)
    monkeypatch.setattr(ours, "_network", forbidden)
    with pytest.raises(ValueError, match=match):
        ours.request(PROMPT, **{"height": 16, "width": 16, **kwargs})


def test_align_your_steps_follows_the_model_family(pipes, monkeypatch):
    ours = pipes[0]
    assert ours.request(PROMPT, spacing="ays", height=16, width=16).spacing == "ays"
    monkeypatch.setattr(ours.components.info, "family", "sdxl")
    req = ours.request(PROMPT, steps=7, spacing="ays", height=16, width=16)
    assert req.spacing == "ays_sdxl" and ours.sigmas(req).tolist() == ours.schedule.sigmas_for(7, "ays_sdxl").tolist()


@pytest.fixture(scope="module")
def lcm(sd1_folder, tmp_path_factory):
    """(diffusers' LatentConsistencyModelPipeline, its saved folder): the tiny model with an LCM-distilled U-Net."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    base = StableDiffusionPipeline.from_pretrained(sd1_folder)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 32})
    torch.manual_seed(0)
    unet.load_state_dict(base.unet.state_dict(), strict=False)       # cond_proj stays at its random init
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0, 0.5)        # so that the guidance visibly matters
    theirs = LatentConsistencyModelPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                            unet=unet, scheduler=LCMScheduler.from_config(base.scheduler.config),
                                            safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("lcm") / "lcm"
    theirs.save_pretrained(folder)
    return theirs, folder


def test_an_lcm_distilled_unet_takes_the_guidance_embedded_as_diffusers_does(lcm):
    theirs, folder = lcm
    ours = Pipeline.from_pretrained(folder)
    assert ours.unet.config.time_cond_proj_dim == 32
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = {}
    for steps, guidance in ((1, 1.5), (4, 1.5), (4, 8.0)):
        expected = theirs(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=latents, height=16,
                          width=16, output_type="np", generator=torch.Generator().manual_seed(11)).images
        got[steps, guidance] = ours(PROMPT, steps=steps, guidance=guidance, sampler="lcm", seed=11, latents=latents,
                                    height=16, width=16, output_type="np", progress=False)
        assert np.abs(got[steps, guidance] - expected).max() <= 2 / 255, (steps, guidance)
    assert np.abs(got[4, 1.5] - got[4, 8.0]).max() > 0.01          # one U-Net call a step, the guidance embedded


def test_an_lcm_distilled_single_file_loads_with_its_guidance_embedding(lcm, tmp_path):
    """An original-layout file of an LCM model (LCM_Dreamshaper_v7's single files) holds the w-embedding projection
    as ``model.diffusion_model.time_embedding.cond_proj.weight``; without ldm's metadata its width is read from
    that key, and the file draws as the folder."""
    from safetensors.torch import load_file, save_file

    from ldm.checkpoints import save_single_file

    folder_pipe = Pipeline.from_pretrained(lcm[1])
    save_single_file(folder_pipe.components, tmp_path / "lcm.safetensors")
    tensors = load_file(str(tmp_path / "lcm.safetensors"))
    assert tensors["model.diffusion_model.time_embedding.cond_proj.weight"].shape[1] == 32     # (time width, w width)
    save_file(tensors, str(tmp_path / "bare.safetensors"))           # no ldm metadata: the config is inferred
    single = Pipeline.from_pretrained(tmp_path / "bare.safetensors")
    assert single.unet.config.time_cond_proj_dim == 32
    run = dict(steps=4, guidance=4.0, sampler="lcm", seed=3, height=16, width=16, output_type="np", progress=False)
    assert np.abs(single(PROMPT, **run) - folder_pipe(PROMPT, **run)).max() <= 1e-5
    del tensors["model.diffusion_model.time_embedding.cond_proj.weight"]
    save_file(tensors, str(tmp_path / "plain.safetensors"))          # the same file as a plain SD 1.x U-Net
    plain = Pipeline.from_pretrained(tmp_path / "plain.safetensors")
    assert plain.unet.config.time_cond_proj_dim is None
