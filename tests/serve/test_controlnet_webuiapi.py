"""sd-webui-controlnet's API on a real ``ldm serve`` (127.0.0.1), driven by webuiapi (a client nobody here wrote):
``ControlNetUnit``s draw what the Python API draws with the same settings, the extension's routes answer, bad
units are 422 naming the unit and field, and a job redrawn after a restart gives the same bytes. Also issue 35's
client check: A1111 sampler and scheduler names through webuiapi equal the Python API, and a progress poll
during a job returns a PNG."""
from __future__ import annotations

import base64
import io
import shutil
import sqlite3
import threading
import time

import numpy as np
import pytest
from PIL import Image

from control_fixtures import tiny_controlnet, write_original_controlnet
from ldm import Control, Pipeline
from ldm.pipeline.preprocess import canny

webuiapi = pytest.importorskip("webuiapi", reason="pip install -e '.[test]'")
pytestmark = pytest.mark.usefixtures("single_thread")   # as the server (OMP_NUM_THREADS=1): the same float sums
# alwayson_scripts={}: webuiapi's txt2img writes its units into its own default dict, which later calls reuse
DRAW = dict(seed=7, steps=4, cfg_scale=5.0, width=32, height=32)


@pytest.fixture(scope="module")
def files(sd1_folder, tmp_path_factory):
    """The tiny SD model and a --control-dir with one tiny ControlNet in lllyasviel's original layout."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("cn") / "controlnet"
    folder.mkdir()
    net = tiny_controlnet(UNet2DConditionModel.from_pretrained(sd1_folder / "unet"), seed=5)
    write_original_controlnet(net, folder / "tiny_canny.safetensors")
    return sd1_folder, folder


@pytest.fixture(scope="module")
def pipe(files):
    return Pipeline.from_pretrained(files[0])


def photo() -> Image.Image:
    """Something with edges: two rectangles on grey, not the request's size or aspect."""
    a = np.full((40, 56, 3), 90, np.uint8)
    a[5:30, 8:30] = (230, 40, 40)
    a[18:36, 32:50] = (30, 200, 60)
    return Image.fromarray(a)


def python_image(pipe, prompt, control=None, sampler="euler", spacing=None, **draw):
    return np.asarray(pipe(prompt, steps=draw["steps"], guidance=draw["cfg_scale"], sampler=sampler, spacing=spacing,
                           height=draw["height"], width=draw["width"], seed=draw["seed"], control=control,
                           progress=False)[0])


def test_webuiapi_controlnet_units_draw_what_the_python_api_draws(start_server, files, pipe, tmp_path):
    model, control_dir = files
    data = tmp_path / "data"
    server = start_server("--model", str(model), "--control-dir", str(control_dir), data=data)
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    titles = api.controlnet_model_list()    # the folder's, then ldm's own (default-canny) where shipped
    title = titles[0]
    assert title.startswith("tiny_canny [") and len(title) == len("tiny_canny [12345678]")
    assert all(t.startswith("default-canny [") for t in titles[1:])
    assert api.controlnet_module_list()[:2] == ["none", "canny"]
    assert server.client.get("/controlnet/version").json() == {"version": 3}

    edges = canny(photo().resize((32, 32)))
    unit = webuiapi.ControlNetUnit(image=edges, module="none", model=title, weight=0.8, guidance_start=0.1,
                                   guidance_end=0.9, resize_mode="Just Resize", control_mode=1)
    got = api.txt2img(prompt="a house", sampler_name="Euler", controlnet_units=[unit], alwayson_scripts={}, **DRAW)
    cn = pipe.load_control(control_dir / "tiny_canny.safetensors")
    expected = python_image(pipe, "a house", [Control(cn, edges, 0.8, 0.1, 0.9, mode="prompt")], **DRAW)
    np.testing.assert_array_equal(np.asarray(got.image), expected)
    assert np.abs(expected.astype(int) - python_image(pipe, "a house", **DRAW)).max() > 2   # the unit acts
    assert ("ControlNet 0: \"Module: none, Model: tiny_canny, Weight: 0.8, Resize Mode: Just Resize, Guidance "
            "Start: 0.1, Guidance End: 0.9, Control Mode: My prompt is more important\"") in got.info["infotexts"][0]
    assert got.info["extra_generation_params"]["ControlNet 0"].startswith("Module: none, Model: tiny_canny")

    # the canny module on a photo, with webuiapi's defaults (Resize and Fill, processor_res 512, thresholds 64)
    unit = webuiapi.ControlNetUnit(image=photo(), module="canny", model="tiny_canny")
    got = api.txt2img(prompt="a house", sampler_name="Euler", controlnet_units=[unit], alwayson_scripts={}, **DRAW)
    control = Control(cn, photo(), module="canny", resize_mode="Resize and Fill", processor_res=512, threshold_a=64,
                      threshold_b=64)
    np.testing.assert_array_equal(np.asarray(got.image), python_image(pipe, "a house", [control], **DRAW))
    assert "Module: canny, Model: tiny_canny, Weight: 1.0, Resize Mode: Resize and Fill, Processor Res: 512, " \
           "Threshold A: 64.0, Threshold B: 64.0," in got.info["infotexts"][0]
    # img2img: a unit without an image takes the init image, as the extension does
    init = photo().resize((32, 32))
    unit = webuiapi.ControlNetUnit(module="canny", model="tiny_canny", weight=0.7)
    got = api.img2img(images=[init], prompt="a house", sampler_name="Euler", denoising_strength=0.6,
                      controlnet_units=[unit], alwayson_scripts={}, **DRAW)
    control = Control(cn, init, 0.7, module="canny", resize_mode="Resize and Fill", processor_res=512, threshold_a=64,
                      threshold_b=64)
    expected = pipe.img2img("a house", init, strength=0.6, steps=4, guidance=5.0, sampler="euler", seed=7,
                            control=control, progress=False)[0]
    np.testing.assert_array_equal(np.asarray(got.image), np.asarray(expected))
    detected = api.controlnet_detect([photo()], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    map_ = detected.images[0]
    assert map_.size == (90, 64) and set(np.unique(np.asarray(map_))) == {0, 255}

    # bad units: 422 naming the unit and the field; nothing drawn
    good = {"image": webuiapi.raw_b64_img(edges), "model": "tiny_canny", "module": "none"}
    for change, field in [({"model": "nope"}, "model"), ({"weight": 3}, "weight"), ({"module": "hed"}, "module"),
                          ({"guidance_start": 0.9, "guidance_end": 0.2}, "guidance_end"),
                          ({"control_mode": 7}, "control_mode"), ({"image": "not base64!"}, "image"),
                          ({"resize_mode": "Stretch"}, "resize_mode")]:
        body = {"prompt": "x", **DRAW, "alwayson_scripts": {"ControlNet": {"args": [good, {**good, **change}]}}}
        r = server.client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 422, (change, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", f"alwayson_scripts.controlnet.args[1].{field}"], r.text
    other = {"prompt": "x", **DRAW, "alwayson_scripts": {"ADetailer": {"args": [{"ad_model": "face"}]}}}
    assert server.client.post("/sdapi/v1/txt2img", json=other).status_code == 422

    # durable: the job, put back in the queue with its images gone (a kill before drawing), is redrawn the same
    jobs = server.client.get("/ldm/v1/jobs").json()["jobs"]
    job = [j for j in jobs if j["status"] == "done" and j["api"] == "a1111"][-1]    # img2img with a canny unit
    first = server.client.get(job["images"][0]).content
    server.stop()
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        db.execute("UPDATE jobs SET status = 'running', images = 0 WHERE id = ?", (job["id"],))
    shutil.rmtree(data / "images" / job["id"])
    again = start_server("--model", str(model), "--control-dir", str(control_dir), data=data)
    assert again.wait_job(job["id"])["status"] == "done"
    assert again.client.get(job["images"][0]).content == first


def test_webuiapi_sampler_and_scheduler_names_and_a_live_preview(start_server, files, pipe):
    """Issue 35's client check: "UniPC", "LCM" and "SGM Uniform" equal the Python API's unipc, lcm, sgm_uniform."""
    server = start_server("--model", str(files[0]))
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    for name, scheduler, sampler, spacing in [("UniPC", None, "unipc", None), ("LCM", None, "lcm", None),
                                              ("Euler", "SGM Uniform", "euler", "sgm_uniform")]:
        got = api.txt2img(prompt="a lamp", sampler_name=name, scheduler=scheduler, alwayson_scripts={}, **DRAW)
        np.testing.assert_array_equal(np.asarray(got.image), python_image(pipe, "a lamp", None, sampler, spacing,
                                                                          **DRAW), err_msg=name)
    # a progress poll (webuiapi's get_progress) while a long job runs returns the step's preview as a PNG
    thread = threading.Thread(target=api.txt2img, kwargs=dict(prompt="a lamp", sampler_name="Euler", steps=150,
                                                              n_iter=4, width=64, height=64,
                                                              alwayson_scripts={}))
    thread.start()
    preview, deadline = None, time.monotonic() + 60
    while preview is None and time.monotonic() < deadline:
        current = api.get_progress().get("current_image")
        preview = Image.open(io.BytesIO(base64.b64decode(current))) if current else None
        time.sleep(0.05)
    api.interrupt()
    thread.join(60)
    assert preview is not None and preview.format == "PNG"
