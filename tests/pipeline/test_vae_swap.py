"""Pipeline.load_vae: a second AutoencoderKL (diffusers folder, SD single file with or without first_stage_model.)
and TAESD draw what diffusers draws with ``pipe.vae`` swapped; img2img encodes through TAESD; the PNG names the
VAE as A1111 does; ``ldm generate --vae``; previews; wrong files are one clear error and keep the old VAE."""

import base64
import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm import Pipeline
from ldm.checkpoints import CheckpointError
from ldm.checkpoints.keys import scatter, vae_keymaps
from ldm.models.taesd import AutoencoderTiny, original_key
from ldm.pipeline.png_info import parse_parameters
from ldm.pipeline import vae_swap
from ldm.pipeline.vae_swap import cheap_rgb, preview_images, previews
from ldm.serve.worker import Progress
from tiny_models import perturb, tiny_vae_config

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = "a turtle playing basketball"
H, W = 24, 32
# two levels, as the tiny model's VAE: latents at 1/2 of the image side
TINY_TAESD = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(12, 12),
                  num_encoder_blocks=(1, 2), num_decoder_blocks=(2, 1))


@pytest.fixture(scope="module")
def folder(sd1_folder):
    return sd1_folder


@pytest.fixture(scope="module")
def kl(tmp_path_factory):
    """A second diffusers AutoencoderKL (another seed), saved as a folder and as SD single files."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("kl")
    torch.manual_seed(7)
    vae = perturb(AutoencoderKL(**tiny_vae_config()), 7, scale=0.05).eval()
    vae.save_pretrained(root / "vae-folder")
    from ldm.models.vae import AutoencoderKL as Ours, VAEConfig

    ours = Ours(VAEConfig.from_dict(dict(vae.config)))
    original = scatter(vae_keymaps(ours.state_dict(), 2, prefix=""), vae.state_dict())
    save_file(original, str(root / "vae-ft-tiny.safetensors"))
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in original.items()}}, root / "prefixed.ckpt")
    return vae, root


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    from diffusers import AutoencoderTiny as Theirs

    root = tmp_path_factory.mktemp("taesd")
    torch.manual_seed(8)
    vae = perturb(Theirs(**TINY_TAESD), 8, scale=0.05).eval()
    vae.save_pretrained(root / "taesd")
    halves = {"encoder": {}, "decoder": {}}
    for key, value in vae.state_dict().items():
        half, theirs = original_key(key)
        halves[half][theirs] = value.clone()
    for half, state in halves.items():
        torch.save(state, root / f"taesd_{half}.pth")
    return vae, root


def diffusers_images(folder, vae, latents, **kwargs):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(folder)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.vae = vae
    theirs.set_progress_bar_config(disable=True)
    return theirs(PROMPT, num_inference_steps=4, guidance_scale=7.5, latents=latents, height=H, width=W,
                  output_type="np", **kwargs).images


def ldm_images(pipe, latents, **kwargs):
    return pipe(PROMPT, steps=4, guidance=7.5, sampler="ddim", latents=latents, height=H, width=W,
                output_type="np", progress=False, **kwargs)


def noise():
    return torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["vae-folder", "vae-ft-tiny.safetensors", "prefixed.ckpt"])
def test_a_second_autoencoder_kl_draws_what_diffusers_draws(folder, kl, name):
    vae, root = kl
    pipe = Pipeline.from_pretrained(folder)
    before = ldm_images(pipe, noise())
    assert pipe.load_vae(root / name) is pipe
    ours = ldm_images(pipe, noise())
    expected = diffusers_images(folder, vae, noise())
    assert np.abs(ours - expected).max() <= 2 / 255
    assert np.abs(ours - before).max() > 0.02     # the VAE did change


@pytest.mark.parametrize("name", ["taesd", "taesd_decoder.pth"])
def test_taesd_draws_what_diffusers_draws_with_autoencoder_tiny(folder, taesd, name):
    vae, root = taesd
    pipe = Pipeline.from_pretrained(folder).load_vae(root / name)
    assert isinstance(pipe.vae, AutoencoderTiny) and pipe.vae.config.scaling_factor == 1.0
    expected = diffusers_images(folder, vae, noise())
    assert np.abs(ldm_images(pipe, noise()) - expected).max() <= 2 / 255


def test_img2img_encodes_through_taesd(folder, taesd):
    vae, root = taesd
    pipe = Pipeline.from_pretrained(folder).load_vae(root / "taesd_encoder.pth")
    pixels = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(pipe.encode_images(pixels), vae.encode(pixels).latents, atol=1e-5, rtol=1e-5)
    image = Image.fromarray(((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    source = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        round_trip = ((vae.decode(vae.encode(source).latents).sample.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 0)
    out = pipe.img2img(PROMPT, image, strength=0.0, steps=4, output_type="np", progress=False)[0]
    assert np.abs(out - round_trip.numpy()).max() <= 2 / 255


def test_png_names_the_vae_as_a1111_does(folder, kl):
    _, root = kl
    path = root / "vae-ft-tiny.safetensors"
    pipe = Pipeline.from_pretrained(folder)
    plain = pipe(PROMPT, steps=2, height=H, width=W, seed=1, progress=False)[0]
    assert "VAE" not in parse_parameters(plain.info["parameters"])
    image = pipe.load_vae(path)(PROMPT, steps=2, height=H, width=W, seed=1, progress=False)[0]
    fields = parse_parameters(image.info["parameters"])
    assert fields["VAE"] == "vae-ft-tiny.safetensors"
    assert fields["VAE hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    recorded = json.loads(image.info["ldm"])
    assert recorded["vae"] == fields["VAE"] and recorded["vae_hash"] == fields["VAE hash"]
    # infotext order as A1111 writes it: ..., Model hash, Model, VAE hash, VAE, ...
    text = image.info["parameters"]
    assert text.index("Model:") < text.index("VAE hash:") < text.index("VAE:")


def test_swapped_vae_keeps_the_pipelines_dtype_lean_and_tiling(folder, taesd):
    _, root = taesd
    pipe = Pipeline.from_pretrained(folder, vae_dtype=torch.bfloat16)
    pipe.enable_vae_tiling(16)
    pipe.load_vae(root / "taesd")
    assert pipe.vae.dtype == torch.bfloat16 and pipe.vae.tiling and pipe.vae.tile_size == 16
    assert pipe.components.vae is pipe.vae
    image = pipe(PROMPT, steps=2, height=H, width=W, seed=1, progress=False, output_type="np")[0]
    assert np.isfinite(image).all()


def test_wrong_files_are_one_error_naming_the_file_and_keep_the_vae(folder, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tiny_models import tiny_unet_config

    pipe = Pipeline.from_pretrained(folder)
    vae = pipe.vae
    unet = tmp_path / "unet.safetensors"
    save_file(UNet2DConditionModel(**tiny_unet_config()).state_dict(), str(unet))
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    wide = tmp_path / "wide-vae"
    AutoencoderKL(**{**tiny_vae_config(), "latent_channels": 16}).save_pretrained(wide)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path, match in ((unet, "not a VAE: its tensors look like a U-Net"),
                        (lora, "not a VAE: its tensors look like a LoRA"),
                        (wide, "16 latent channels; this model's U-Net works on 4"),
                        (tmp_path / "missing.safetensors", "no such file"),
                        (text, "not a VAE file")):
        with pytest.raises(CheckpointError, match=match) as info:
            pipe.load_vae(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert pipe.vae is vae


def test_previews_show_each_steps_estimate(folder, taesd, monkeypatch):
    _, root = taesd
    pipe = Pipeline.from_pretrained(folder)
    seen, steps = [], []
    pipe(PROMPT, steps=3, height=H, width=W, seed=1, progress=False,
         callback=previews(pipe, lambda step, images: seen.append((step, images)), callback=steps.append))
    assert [s for s, _ in seen] == [1, 2, 3] and len(steps) == 3
    assert seen[0][1][0].size == (W // 2, H // 2)          # the cheap linear map: latent resolution
    pipe.load_vae(root / "taesd")
    seen.clear()
    pipe(PROMPT, steps=3, height=H, width=W, seed=1, progress=False,
         callback=previews(pipe, lambda step, images: seen.append((step, images)), every=2))
    assert [s for s, _ in seen] == [2, 3] and seen[0][1][0].size == (W, H)   # TAESD: full size
    # a plain callback finds the preview in its info, made only if read
    made, got = [], []
    monkeypatch.setattr(vae_swap, "preview_images", lambda p, z: made.append(1) or preview_images(p, z))
    pipe(PROMPT, steps=2, height=H, width=W, seed=1, progress=False, callback=lambda info: got.append(info["i"]))
    assert got == [0, 1] and not made
    pipe(PROMPT, steps=2, height=H, width=W, seed=1, progress=False,
         callback=lambda info: got.append(info.get("preview")[0].size))
    assert got[2:] == [(W, H), (W, H)] and len(made) == 2
    z = torch.zeros(1, 4, 2, 2)
    z[:, 3] = -1.0       # A1111's SD 1.5 factors: the 4th channel's negative is bluish
    rgb = cheap_rgb(z)[0, :, 0, 0]
    assert torch.allclose(rgb, torch.tensor([0.184, 0.271, 0.473]))


def test_generate_and_batch_take_vae(folder, kl, tmp_path, capsys):
    from ldm.cli import main

    _, root = kl
    vae = root / "vae-ft-tiny.safetensors"
    size = ["--height", str(H), "--width", str(W), "--steps", "2", "--model", str(folder), "--vae", str(vae)]
    assert main(["generate", PROMPT, "-o", str(tmp_path / "a.png"), "--seed", "1", "-q", *size]) == 0
    fields = parse_parameters(Image.open(tmp_path / "a.png").info["parameters"])
    assert fields["VAE"] == vae.name and len(fields["VAE hash"]) == 10
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "-q", *size]) == 0
    png = next((tmp_path / "out").glob("*.png"))
    assert parse_parameters(Image.open(png).info["parameters"])["VAE"] == vae.name
    assert json.loads((tmp_path / "out" / "batch.json").read_text())["settings"]["vae"] == fields["VAE hash"]
    capsys.readouterr()
    assert main(["generate", "--from-png", str(tmp_path / "a.png"), "-o", str(tmp_path / "c.png"), "-q",
                 "--model", str(folder)]) == 0
    assert "decoded with the VAE 'vae-ft-tiny.safetensors'" in capsys.readouterr().err
    status = main(["generate", PROMPT, "-o", str(tmp_path / "b.png"), *size[:-1], str(folder / "unet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "not a VAE" in err[0] and not (tmp_path / "b.png").exists()


def test_serve_lists_the_vae_and_names_it_in_infotexts(folder, taesd, tmp_path):
    testclient = pytest.importorskip("fastapi.testclient")
    from ldm.serve import Server, ServeSettings
    from ldm.serve.app import create_app

    _, root = taesd
    settings = ServeSettings(model=str(folder), data=str(tmp_path / "data"), vae=str(root / "taesd_decoder.pth"))
    server = Server(settings, pipes=[Pipeline.from_pretrained(folder)])
    with testclient.TestClient(create_app(server)) as client:
        assert client.get("/sdapi/v1/sd-vae").json() == [{"model_name": "taesd_decoder.pth",
                                                          "filename": str(root / "taesd_decoder.pth")}]
        assert client.get("/sdapi/v1/options").json()["sd_vae"] == "taesd_decoder.pth"
        assert client.post("/sdapi/v1/options", json={"sd_vae": "Automatic"}).status_code == 200
        assert client.post("/sdapi/v1/options", json={"sd_vae": "other.safetensors"}).status_code == 422
        body = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": W, "height": H,
                                                      "seed": 1}).json()
        info = json.loads(body["info"])
        assert info["sd_vae_name"] == "taesd_decoder.pth" and "VAE: taesd_decoder.pth" in info["infotexts"][0]
        # a progress poll asks the running job's worker for a preview and returns the last one rendered
        worker = server.workers[0]
        worker.progress = Progress("running-job", 1, 4, 0, 1, preview="UE5H")
        body = client.get("/sdapi/v1/progress").json()
        assert body["current_image"] == "UE5H" and worker.progress.want_preview
        assert client.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
        worker.progress = Progress()


def test_the_worker_renders_a_preview_at_the_step_after_it_is_asked(folder, taesd):
    from ldm.serve.worker import Worker

    _, root = taesd
    worker = Worker(Pipeline.from_pretrained(folder), queue=None, store=None, notify=lambda _: None)
    worker.progress = Progress("job", 0, 3, 0, 1)
    z = torch.randn(2, 4, H // 2, W // 2)
    worker._on_step({"i": 0, "steps": 3, "denoised": z})
    assert worker.progress.preview is None
    for vae, size in ((None, (W // 2, H // 2)), (root / "taesd", (W, H))):
        if vae is not None:
            worker.pipe.load_vae(vae)
        worker.progress.want_preview = True
        worker._on_step({"i": 1, "steps": 3, "denoised": z})
        image = Image.open(io.BytesIO(base64.b64decode(worker.progress.preview)))
        assert image.format == "PNG" and image.size == size and not worker.progress.want_preview


def test_a_pipeline_with_taesd_saves_a_folder_both_load(folder, taesd, tmp_path):
    from diffusers import AutoencoderTiny as Theirs, StableDiffusionPipeline

    vae, root = taesd
    pipe = Pipeline.from_pretrained(folder).load_vae(root / "taesd")
    expected = ldm_images(pipe, noise())
    pipe.save_pretrained(tmp_path / "saved")
    again = Pipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(again.vae, AutoencoderTiny)
    assert np.abs(ldm_images(again, noise()) - expected).max() == 0
    assert isinstance(StableDiffusionPipeline.from_pretrained(tmp_path / "saved").vae, Theirs)
    with pytest.raises(ValueError, match="save a diffusers folder instead"):
        from ldm.checkpoints import save_single_file

        save_single_file(again.components, tmp_path / "model.safetensors")
    # an SD VAE file swapped in later decodes at the model's own scale (its family's), not TAESD's 1.0
    from ldm.pipeline.vae_swap import model_latent_scale

    assert model_latent_scale(again) == (0.18215, None)


def test_serve_with_a_wrong_vae_is_one_line(folder, tmp_path):
    import subprocess
    import sys

    pytest.importorskip("fastapi", reason="ldm serve needs the serve extra")
    done = subprocess.run([sys.executable, "-m", "ldm", "serve", "--model", str(folder), "--vae",
                           str(folder / "unet"), "--data", str(tmp_path / "data"), "--port", "7999"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a VAE" in done.stderr, done.stderr


def test_a_vae_given_as_a_model_says_to_swap_it_in(kl, taesd):
    from ldm.checkpoints import describe

    for path in (kl[1] / "vae-ft-tiny.safetensors", taesd[1] / "taesd_decoder.pth"):
        with pytest.raises(CheckpointError, match="looks like a VAE on its own: swap it in with --vae"):
            describe(path)


def test_a_pipeline_folder_lends_its_vae(folder, kl):
    from ldm.pipeline.vae_swap import vae_metadata
    from ldm.pipeline.png_info import weights_hash

    pipe = Pipeline.from_pretrained(folder)
    own = ldm_images(pipe, noise())
    pipe.load_vae(kl[1] / "vae-folder").load_vae(folder)        # away and back: the model's own VAE again
    assert np.abs(ldm_images(pipe, noise()) - own).max() == 0
    assert vae_metadata(pipe) == {"vae": folder.name, "vae_hash": weights_hash(folder / "vae")}


def test_openvino_backend_decodes_through_the_swapped_vae(folder, taesd, tmp_path, monkeypatch):
    """The default backend where OpenVINO is installed exports the VAE decoder: it must follow the swap."""
    pytest.importorskip("openvino")
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    ov = Pipeline.from_pretrained(folder, backend="openvino")
    torch_pipe = Pipeline.from_pretrained(folder, backend="torch")
    assert ov.backend == "openvino"
    z = noise()
    torch.testing.assert_close(ov.decode_latents(z), torch_pipe.decode_latents(z), atol=1e-4, rtol=1e-4)  # exported
    ov.load_vae(taesd[1] / "taesd"), torch_pipe.load_vae(taesd[1] / "taesd")
    torch.testing.assert_close(ov.decode_latents(z), torch_pipe.decode_latents(z), atol=1e-4, rtol=1e-4)


def test_sdxl_decodes_a_bare_vae_file_at_its_own_scale(kl, tmp_path):
    """A VAE file carries no latent scale: on SDXL it decodes at SDXL's 0.13025, and draws what diffusers'
    StableDiffusionXLPipeline draws with that VAE configured so (as the SDXL VAE's config.json is); previews use
    A1111's SDXL factors."""
    import diffusers

    from tiny_sdxl import save_tiny_sdxl

    vae, root = kl
    base = save_tiny_sdxl(tmp_path / "xl", seed=3)
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
    theirs.scheduler = diffusers.DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    # (no "_use_default_values": from_config would put the default 0.18215 back)
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    theirs.vae = diffusers.AutoencoderKL(**{**config, "scaling_factor": 0.13025})
    theirs.vae.load_state_dict(vae.state_dict())
    assert theirs.vae.config.scaling_factor == 0.13025
    expected = theirs(PROMPT, num_inference_steps=4, guidance_scale=5.0, latents=noise(), height=H, width=W,
                      output_type="np").images
    pipe = Pipeline.from_pretrained(base).load_vae(root / "vae-ft-tiny.safetensors")
    assert pipe.vae.config.scaling_factor == 0.13025
    ours = pipe(PROMPT, steps=4, guidance=5.0, sampler="ddim", latents=noise(), height=H, width=W, output_type="np",
                progress=False)
    assert np.abs(ours - expected).max() <= 2 / 255
    seen = []
    pipe(PROMPT, steps=1, height=H, width=W, seed=1, progress=False, callback=seen.append)
    rgb = np.asarray(seen[0]["preview"][0], dtype=np.float32) / 127.5 - 1
    expected = cheap_rgb(seen[0]["denoised"], "sdxl")[0].clamp(-1, 1).permute(1, 2, 0).numpy()
    assert np.abs(rgb - expected).max() <= 1 / 127.5
