"""ldm's durable job API, images by id, and the server's guards (--api-key, --max-queue, --max-size/steps)."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from ldm.pipeline.png_info import read_png_info


def submit(server, **body) -> str:
    r = server.client.post("/ldm/v1/jobs", json={"prompt": "red apple", "steps": 3, **body})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    return r.json()["id"]


def wait_running(server, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = server.client.get(f"/ldm/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job.get("progress", {}).get("step", 0) >= 1:
            return job
        time.sleep(0.05)
    raise TimeoutError(job)


def test_job_lifecycle_images_by_id_and_listing(server, tmp_path):
    job_id = submit(server, seed=11, num=2, guidance=4, sampler="euler", width=64, height=64, negative_prompt="dark")
    job = server.wait_job(job_id)
    assert job["status"] == "done" and job["error"] is None
    assert job["images"] == [f"/ldm/v1/images/{job_id}-0", f"/ldm/v1/images/{job_id}-1"]
    assert job["seeds"] == [11, 12] and job["settings"]["sampler"] == "euler" and job["settings"]["num"] == 2
    r = server.client.get(job["images"][1])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    (tmp_path / "x.png").write_bytes(r.content)
    info = read_png_info(tmp_path / "x.png")
    assert (info.prompt, info.seed, info.negative_prompt, info.guidance, info.steps) == ("red apple", 12, "dark", 4, 3)
    listed = server.client.get("/ldm/v1/jobs").json()["jobs"]
    assert job_id in [j["id"] for j in listed]
    assert server.client.delete(f"/ldm/v1/jobs/{job_id}").status_code == 409  # done: nothing to cancel


def test_defaults_fill_what_a_job_leaves_out_and_seeds_are_recorded(server):
    job = server.wait_job(submit(server))
    settings = server.client.get("/ldm/v1/info").json()["defaults"]
    assert job["settings"]["width"] == settings["width"] and job["settings"]["guidance"] == settings["guidance"]
    assert isinstance(job["seeds"][0], int)


def test_cancel_queued_and_running_jobs(server):
    running = submit(server, steps=150, num=2)
    queued = submit(server, steps=150)
    wait_running(server, running)
    r = server.client.delete(f"/ldm/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = server.client.delete(f"/ldm/v1/jobs/{running}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert server.client.get(f"/ldm/v1/jobs/{running}").json()["images"] == []
    assert server.wait_job(submit(server))["status"] == "done"  # the worker goes on


@pytest.mark.parametrize("path", ["/ldm/v1/jobs/nope", "/ldm/v1/images/nope", "/ldm/v1/images/..%2Fjobs.sqlite3",
                                  "/ldm/v1/images/" + "0" * 32 + "-0", "/static/..%2F__init__.py",
                                  "/static/index.html%00", "/ldm/v1/images/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd"])
def test_unknown_ids_and_paths_are_404(server, path):
    assert server.client.get(path).status_code == 404
    if path.startswith("/ldm/v1/jobs/"):
        assert server.client.delete(path).status_code == 404


def test_an_image_index_past_the_job_is_404(server):
    job_id = submit(server)
    server.wait_job(job_id)
    assert server.client.get(f"/ldm/v1/images/{job_id}-0").status_code == 200
    assert server.client.get(f"/ldm/v1/images/{job_id}-1").status_code == 404


@pytest.mark.parametrize(("change", "field"), [({"steps": 0}, "steps"), ({"width": 65}, "width"), ({"num": 0}, "num"),
                                               ({"sampler": "Euler a"}, "sampler"), ({"cfg_scale": 3}, "cfg_scale"),
                                               ({"prompt": ""}, "prompt"), ({"seed": -1}, "seed"),
                                               ({"num": 65}, "num"), ({"guidance": "x"}, "guidance")])
def test_job_requests_are_checked_as_prompt_file_lines(server, change, field):
    r = server.client.post("/ldm/v1/jobs", json={"prompt": "x", **change})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][-1] == field and field in detail["msg"]


def test_page_and_its_files_are_served(server):
    page = server.client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "http" not in page.text.replace("http-equiv", "")
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = server.client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "https://" not in r.text and "//cdn" not in r.text


def test_api_key_is_required_on_every_request(start_server):
    guarded = start_server("--api-key", "s3cret", api_key="s3cret")
    assert guarded.client.get("/sdapi/v1/samplers").status_code == 200
    anonymous = guarded.client.__class__(base_url=guarded.url)
    wrong = guarded.client.__class__(base_url=guarded.url, headers={"Authorization": "Bearer nope"})
    for client in (anonymous, wrong):
        for method, path in (("GET", "/"), ("GET", "/sdapi/v1/samplers"), ("POST", "/sdapi/v1/txt2img"),
                             ("POST", "/ldm/v1/jobs"), ("GET", "/ldm/v1/jobs"), ("GET", "/static/app.js")):
            r = client.request(method, path, json={"prompt": "x"})
            assert r.status_code == 401, (method, path, r.text)
        client.close()
    assert guarded.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).status_code == 200


def test_full_queue_is_429_and_limits_come_from_the_flags(start_server):
    small = start_server("--max-queue", "1", "--max-size", "32", "--max-steps", "200")
    first = submit(small, steps=200)
    r = small.client.post("/ldm/v1/jobs", json={"prompt": "x"})
    assert r.status_code == 429 and "queue is full" in r.json()["detail"]
    assert small.client.post("/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 429
    too_big = small.client.post("/ldm/v1/jobs", json={"prompt": "x", "width": 64})
    assert too_big.status_code == 422 and "--max-size" in too_big.text
    small.client.delete(f"/ldm/v1/jobs/{first}")
    job = small.wait_job(submit(small, steps=2, width=32, height=32))
    image = Image.open(io.BytesIO(small.client.get(job["images"][0]).content))
    assert job["status"] == "done" and image.size == (32, 32)
