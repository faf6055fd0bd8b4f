"""A server killed with SIGKILL mid-job and restarted with the same --data finishes every queued or running job
exactly once, with the bytes an uninterrupted run gives."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx


def find_job(server, api: str) -> dict | None:
    return next((j for j in server.client.get("/ldm/v1/jobs").json()["jobs"] if j["api"] == api), None)


def test_sigkill_then_restart_finishes_every_job_once_with_identical_bytes(start_server, tmp_path):
    data = tmp_path / "data"
    first = start_server(data=data)
    # A1111 request with three passes, sent by a client that will lose its connection when the server dies
    passes = {"prompt": "turtle", "steps": 40, "seed": 3, "n_iter": 3, "sampler_name": "Euler a"}
    threading.Thread(target=lambda: _ignore_disconnect(first, passes), daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = find_job(first, "a1111")
        if job and job["status"] == "running" and job.get("progress", {}).get("iteration", 0) >= 1:
            break
        time.sleep(0.02)
    else:
        raise TimeoutError("the A1111 job never reached its second pass")
    queued = [first.client.post("/ldm/v1/jobs", json={"prompt": p, "seed": s, "steps": 5, "num": 2}).json()["id"]
              for p, s in (("red apple", 1), ("basketball", 2))]
    a1111_id = job["id"]
    assert 1 <= len(job["images"]) < 3
    first.kill()

    second = start_server(data=data)
    ids = [a1111_id, *queued]
    jobs = [second.wait_job(i) for i in ids]
    assert [j["status"] for j in jobs] == ["done"] * 3
    assert [len(j["images"]) for j in jobs] == [3, 2, 2]
    listed = second.client.get("/ldm/v1/jobs").json()["jobs"]
    assert sorted(j["id"] for j in listed) == sorted(ids)  # nothing lost, nothing added
    for job_id, count in zip(ids, (3, 2, 2)):  # one manifest record per image: none was made twice
        records = [json.loads(line) for line in (data / "images" / job_id / "manifest.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in records) == list(range(count))
    assert not list(data.rglob("*.ldm-tmp"))

    got = [[second.client.get(url).content for url in j["images"]] for j in jobs]
    again = second.client.post("/sdapi/v1/txt2img", json=passes).json()["images"]
    assert got[0] == [base64.b64decode(b) for b in again]
    for job_id, (prompt, seed) in zip(queued, (("red apple", 1), ("basketball", 2))):
        redo = second.client.post("/ldm/v1/jobs", json={"prompt": prompt, "seed": seed, "steps": 5, "num": 2}).json()
        fresh = second.wait_job(redo["id"])
        assert [second.client.get(url).content for url in fresh["images"]] == got[ids.index(job_id)]


def _ignore_disconnect(server, body: dict) -> None:
    try:
        server.client.post("/sdapi/v1/txt2img", json=body)
    except httpx.TransportError:
        pass
