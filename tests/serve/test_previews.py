"""Live previews over HTTP: while a job samples, ``/sdapi/v1/progress`` returns the step's estimate of the image
as a base64 PNG in ``current_image`` (the shipped model has no TAESD: A1111's cheap linear latent -> RGB map)."""

import base64
import io
import threading
import time

from PIL import Image


def test_a_progress_poll_during_a_job_returns_a_current_image_png(server):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=server.client.post(
        "/sdapi/v1/txt2img", json={"prompt": "owl", "steps": 150, "n_iter": 3, "width": 64, "height": 64})))
    thread.start()
    image, deadline = None, time.monotonic() + 60
    while image is None and time.monotonic() < deadline:
        progress = server.client.get("/sdapi/v1/progress").json()
        if progress["current_image"]:
            image = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        time.sleep(0.05)
    skipped = server.client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
    server.client.post("/sdapi/v1/interrupt")
    thread.join(60)
    assert image is not None and image.format == "PNG"
    assert image.size[0] == image.size[1] < 64   # latent resolution (the linear map, not a VAE decode)
    assert skipped["current_image"] is None
    assert result["r"].status_code == 200
    assert server.client.get("/sdapi/v1/progress").json()["current_image"] is None   # idle again
