"""``ldm serve --models-dir``: an A1111 install's models, listed and switched as A1111 does, through webuiapi (a
client nobody here wrote) against a real server on 127.0.0.1; a job keeps the model it asked for, across a
restart too."""
from __future__ import annotations


import numpy as np
import pytest

from ldm import Pipeline
from ldm.checkpoints.library import Library
from library_fixtures import build_models_dir

webuiapi = pytest.importorskip("webuiapi", reason="pip install -e '.[test]'")
DRAW = dict(seed=5, steps=2, cfg_scale=3.0, width=32, height=32, sampler_name="Euler")


@pytest.fixture(scope="module")
def models_dir(sd1_folder, tmp_path_factory):
    return build_models_dir(tmp_path_factory.mktemp("webui"), "a1111", sd1_folder)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "ldm-cache"))   # the server's too (it inherits it)


def python_image(model, models_dir, prompt):
    pipe = Pipeline.from_pretrained(model, models_dir=models_dir)
    return np.asarray(pipe(prompt, steps=2, guidance=3.0, sampler="euler", height=32, width=32, seed=5,
                           progress=False)[0])


def test_webuiapi_lists_switches_and_draws_with_the_library(start_server, models_dir):
    server = start_server("--models-dir", str(models_dir))
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    names = api.util_get_model_names()
    assert {"sub/tiny.safetensors", "tiny-diffusers"} <= set(names) and any(n.startswith("ldm-default") for n in names)
    assert [x["name"] for x in api.get_loras()] == ["style"]
    assert [x["model_name"] for x in api.get_sd_vae()] == ["tiny-vae.safetensors"]

    api.util_set_model("sub/tiny.safetensors")
    digest = Library(models_dir).find("checkpoint", "sub/tiny").hash()
    assert api.util_get_current_model() == f"sub/tiny.safetensors [{digest}]"
    assert "shiny" in api.get_embeddings()["loaded"]
    prompt = "a red apple <lora:style:0.7>"
    result = api.txt2img(prompt=prompt, **DRAW)
    np.testing.assert_array_equal(np.asarray(result.image), python_image("sub/tiny", models_dir, prompt))
    assert result.info["sd_model_hash"] == digest

    # one request on another model, without switching the server's (A1111's override_settings)
    other = api.txt2img(prompt="a blue square", override_settings={"sd_model_checkpoint": "tiny-diffusers"}, **DRAW)
    np.testing.assert_array_equal(np.asarray(other.image), python_image("tiny-diffusers", models_dir, "a blue square"))
    assert api.util_get_current_model().startswith("sub/tiny.safetensors")

    # a missing or broken model: 422 naming the field, and the old model keeps serving
    cut = models_dir / "models" / "Stable-diffusion" / "cut.safetensors"
    cut.write_bytes((models_dir / "models" / "Stable-diffusion" / "sub" / "tiny.safetensors").read_bytes()[:4096])
    try:
        assert server.client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        for wanted in ("nope", "cut"):
            response = server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": wanted})
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
        assert "cut.safetensors" not in api.util_get_model_names()         # listed as broken by ldm models only
    finally:
        cut.unlink()
    assert api.util_get_current_model() == f"sub/tiny.safetensors [{digest}]"

    # ldm's job API names a model the same way; the job's settings say which
    job = server.client.post("/ldm/v1/jobs", json={"prompt": "x", "steps": 1, "width": 32, "height": 32,
                                                   "model": "tiny-diffusers.safetensors"})
    assert job.status_code == 422 and job.json()["detail"][0]["loc"] == ["body", "model"]
    job = server.client.post("/ldm/v1/jobs", json={"prompt": "x", "steps": 1, "width": 32, "height": 32,
                                                   "model": "tiny-diffusers"})
    assert server.wait_job(job.json()["id"])["settings"]["model"] == "tiny-diffusers"


def test_a_durable_job_keeps_its_model_across_a_restart(start_server, models_dir, tmp_path):
    from ldm.serve.jobs import JobQueue
    from ldm.serve.spec import JobSpec

    data = tmp_path / "data"
    # what a killed server left: a job accepted for the library's diffusers model, never drawn
    queue = JobQueue(data)
    job = queue.submit(JobSpec(prompt="a blue square", seed=5, steps=2, guidance=3.0, sampler="euler", width=32,
                               height=32, model="tiny-diffusers"), "client")
    queue.close()
    server = start_server("--models-dir", str(models_dir), data=data)
    done = server.wait_job(job.id)
    assert done["status"] == "done", done
    png = server.client.get(done["images"][0]).content
    from io import BytesIO

    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(png)).convert("RGB")),
                                  python_image("tiny-diffusers", models_dir, "a blue square"))
