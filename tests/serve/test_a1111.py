"""The AUTOMATIC1111-compatible endpoints of a real ``ldm serve`` process, with what real clients send."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
from PIL import Image, PngImagePlugin

FAST = {"steps": 3, "seed": 5}
# What webuiapi sends with every txt2img call (its defaults), besides the prompt.
WEBUIAPI = {"enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
            "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
            "styles": [], "seed": 5, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
            "seed_resize_from_w": 0, "sampler_name": "Euler a", "scheduler": "Karras", "batch_size": 1, "n_iter": 1,
            "steps": 3, "cfg_scale": 3.0, "width": 64, "height": 64, "restore_faces": False, "tiling": False,
            "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0,
            "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
            "override_settings_restore_afterwards": True, "script_args": [], "script_name": None,
            "send_images": True, "save_images": False, "alwayson_scripts": {}}


def png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def b64_png(image: Image.Image, text: dict[str, str] | None = None, prefix: bool = False) -> str:
    chunks = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        chunks.add_text(k, v)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunks)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{data}" if prefix else data


def test_txt2img_returns_pngs_with_infotext_and_seeds(server):
    r = server.client.post("/sdapi/v1/txt2img", json={"prompt": "red apple", "batch_size": 2, "n_iter": 2,
                                                      "sampler_name": "DPM++ 2M", "scheduler": "Karras", **FAST})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 4 and not body["images"][0].startswith("data:")
    info = json.loads(body["info"])
    assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5
    assert len(info["infotexts"]) == 4
    first = png(body["images"][0])
    assert first.size == (64, 64)
    assert first.info["parameters"] == info["infotexts"][0]
    assert "Sampler: DPM++ 2M" in first.info["parameters"] and "Schedule type: Karras" in first.info["parameters"]
    assert "Seed: 5" in first.info["parameters"]
    assert body["parameters"]["prompt"] == "red apple" and body["parameters"]["steps"] == 3


def test_same_seed_same_image_and_random_seed_is_recorded(server):
    request = {"prompt": "turtle", "sampler_name": "Euler", **FAST}
    a, b = (server.client.post("/sdapi/v1/txt2img", json=request).json() for _ in range(2))
    assert a["images"] == b["images"]
    r = server.client.post("/sdapi/v1/txt2img", json={**request, "seed": -1}).json()
    seed = json.loads(r["info"])["seed"]
    assert seed >= 0 and f"Seed: {seed}," in png(r["images"][0]).info["parameters"]


def test_webuiapi_payload_is_accepted_and_eta_applies_where_the_sampler_takes_it(server):
    r = server.client.post("/sdapi/v1/txt2img", json={**WEBUIAPI, "prompt": "basketball"})
    assert r.status_code == 200, r.text
    assert "Eta: 1" in json.loads(r.json()["info"])["infotexts"][0]  # Euler a takes eta
    r = server.client.post("/sdapi/v1/txt2img", json={**WEBUIAPI, "prompt": "basketball", "sampler_name": "Heun"})
    assert r.status_code == 200, r.text  # Heun has no eta: ignored as A1111 does
    assert "Eta" not in json.loads(r.json()["info"])["infotexts"][0]
    old_style = server.client.post("/sdapi/v1/txt2img", json={**WEBUIAPI, "prompt": "basketball", "scheduler": None,
                                                              "sampler_name": "Euler a Karras"})
    assert old_style.json()["images"] == server.client.post(
        "/sdapi/v1/txt2img", json={**WEBUIAPI, "prompt": "basketball"}).json()["images"]


@pytest.mark.parametrize("sampler,scheduler,infotext", [
    ("UniPC", "SGM Uniform", "Sampler: UniPC, Schedule type: SGM Uniform"),
    ("LCM", "Automatic", "Sampler: LCM, CFG scale"),            # LCM's own grid: no schedule type
    ("DPM++ 3M SDE", "Align Your Steps", "Sampler: DPM++ 3M SDE, Schedule type: Align Your Steps"),
    ("TCD", "Beta", "Sampler: TCD, Schedule type: Beta"),
])
def test_few_step_samplers_and_schedules_by_their_a1111_names(server, sampler, scheduler, infotext):
    r = server.client.post("/sdapi/v1/txt2img", json={**WEBUIAPI, "prompt": "basketball", "sampler_name": sampler,
                                                      "scheduler": scheduler, "cfg_scale": 1.0, "eta": 0.3})
    assert r.status_code == 200, r.text
    assert infotext in json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("prefix", [False, True])
def test_img2img_and_inpaint_accept_base64_with_or_without_data_prefix(server, prefix):
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    r = server.client.post("/sdapi/v1/img2img", json={"prompt": "apple", "denoising_strength": 0.5,
                                                      "init_images": [b64_png(source, prefix=prefix)], **FAST})
    assert r.status_code == 200, r.text
    out = png(r.json()["images"][0])
    assert "Denoising strength: 0.5" in out.info["parameters"] and out.size == (64, 64)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    r = server.client.post("/sdapi/v1/img2img", json={"prompt": "apple", "init_images": [b64_png(source)],
                                                      "mask": b64_png(mask, prefix=prefix), **FAST})
    assert r.status_code == 200, r.text
    pixels = png(r.json()["images"][0]).convert("RGB")
    assert pixels.getpixel((60, 10)) == (200, 30, 30)  # outside the mask: pasted back untouched
    assert json.loads(r.json()["info"])["is_using_inpainting_conditioning"] is True


def test_png_info_reads_a1111_and_ldm_images(server):
    text = "a lighthouse\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, " \
           "CFG scale: 6.5, Seed: 77, Size: 64x64"
    image = b64_png(Image.new("RGB", (8, 8)), {"parameters": text})
    r = server.client.post("/sdapi/v1/png-info", json={"image": image})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == text and body["parameters"]["Seed"] == "77"
    assert body["ldm"]["sampler"] == "dpmpp_2m" and body["ldm"]["spacing"] == "karras"
    assert body["ldm"]["negative_prompt"] == "blurry" and body["ldm"]["steps"] == 12
    made = server.client.post("/sdapi/v1/txt2img", json={"prompt": "frog", **FAST}).json()["images"][0]
    body = server.client.post("/sdapi/v1/png-info", json={"image": made}).json()
    assert body["ldm"]["prompt"] == "frog" and body["ldm"]["seed"] == 5 and "ldm" in body["items"]
    plain = server.client.post("/sdapi/v1/png-info", json={"image": b64_png(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["ldm"] is None


def test_listing_endpoints(server):
    names = {s["name"] for s in server.client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M", "DDIM", "Euler"} <= names
    assert {"automatic", "karras"} <= {s["name"] for s in server.client.get("/sdapi/v1/schedulers").json()}
    models = server.client.get("/sdapi/v1/sd-models").json()
    assert len(models) == 1 and models[0]["hash"] and models[0]["title"].endswith(f"[{models[0]['hash']}]")
    options = server.client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    assert server.client.post("/sdapi/v1/options", json={"samples_format": "png"}).status_code == 200
    bad = server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other.safetensors"})
    assert bad.status_code == 422 and "sd_model_checkpoint" in bad.text


def test_progress_reports_steps_and_interrupt_stops_the_running_job(server):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=server.client.post(
        "/sdapi/v1/txt2img", json={"prompt": "owl", "steps": 150, "n_iter": 3})))
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = server.client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.05)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    assert progress["state"]["job_count"] >= 1 and progress["eta_relative"] > 0
    assert server.client.post("/sdapi/v1/interrupt").json() == {"interrupted": 1}
    thread.join(60)
    assert result["r"].status_code == 200 and len(result["r"].json()["images"]) < 3
    assert server.client.get("/sdapi/v1/progress").json()["progress"] == 0.0


BAD = [({"width": 65}, "width"), ({"height": 0}, "height"), ({"steps": 0}, "steps"), ({"steps": "x"}, "steps"),
       ({"sampler_name": "Nope"}, "sampler_name"), ({"scheduler": "KL Optimal"}, "scheduler"),
       ({"cfg_scale": "x"}, "cfg_scale"),
       ({"seed": -2}, "seed"), ({"batch_size": 0}, "batch_size"), ({"n_iter": 100}, "batch_size"),
       ({"enable_hr": True}, "enable_hr"), ({"prompt": 3}, "prompt"), ({"steps": 151}, "steps"),
       ({"width": 2048}, "width"), ({"sampler_name": "DDIM", "eta": -1}, "eta"),
       ({"cfg_scale": float("nan")}, "cfg_scale")]


@pytest.mark.parametrize(("change", "field"), BAD)
def test_invalid_values_are_422_naming_the_field(server, change, field):
    r = server.client.post("/sdapi/v1/txt2img", content=json.dumps({"prompt": "x", **change}),
                           headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][-1] == field and field in detail["msg"]


@pytest.mark.parametrize("body", [b'{"prompt": ', b"\xff\xfe", b"[1, 2]", b""])
def test_malformed_bodies_are_422_and_the_server_keeps_serving(server, body):
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/png-info", "/ldm/v1/jobs"):
        r = server.client.post(path, content=body)
        assert r.status_code == 422, (path, r.text)
        assert r.json()["detail"][0]["loc"][0] == "body"
    assert server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST}).status_code == 200


@pytest.mark.parametrize(("body", "field"), [({"init_images": []}, "init_images"),
                                             ({"init_images": ["not base64 at all"]}, "init_images"),
                                             ({"init_images": [b64_png(Image.new("RGB", (64, 64)))],
                                               "mask": "data:image/png;base64,AAAA"}, "mask"),
                                             ({"init_images": [b64_png(Image.new("RGB", (64, 64)))],
                                               "denoising_strength": 1.5}, "denoising_strength")])
def test_img2img_bad_inputs_are_422(server, body, field):
    r = server.client.post("/sdapi/v1/img2img", json={"prompt": "x", **body})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text
