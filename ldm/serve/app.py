"""The HTTP routes: A1111's ``/sdapi/v1/*``, ldm's durable ``/ldm/v1/jobs``, and the web page at ``/``.

Routes stay thin: parse and check (``a1111`` / ``spec``), hand the job to the ``Server`` (queue + workers), and
shape the answer. Status codes: 422 for a bad value (naming the field, FastAPI's ``detail`` shape), 401 without
the ``--api-key``, 429 when the queue is full, 202 for an accepted job, 404 for an unknown id. Nothing here runs
a model: generation happens on the workers' threads, and blocking SQLite/file work goes to a thread too.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ldm.serve import a1111, controlnet
from ldm.serve.jobs import QueueFull
from ldm.serve.model_routes import model_routes
from ldm.serve.server import Server
from ldm.serve.spec import FieldError, spec_from_job_request
from ldm.serve.store import parse_image_id

MAX_BODY = 64 << 20
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}  # the only files the page is made of


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start(asyncio.get_running_loop())
        yield
        server.stop()

    app = FastAPI(title="ldm serve", version="1", lifespan=lifespan)
    page = {name: resources.files("ldm.serve").joinpath("static", name).read_bytes()
            for name in ("index.html", *STATIC)}
    _errors(app)
    _auth(app, server.settings.api_key)
    model_routes(app, server, _body)
    controlnet.controlnet_routes(app, server, _body)
    _a1111_routes(app, server)
    _job_routes(app, server)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page["index.html"])

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:  # a fixed table: no URL becomes a path
            return JSONResponse({"detail": "not found"}, 404)
        return Response(page[name], media_type=STATIC[name])

    return app


# ---------------------------------------------------------------------- errors, auth, bodies
def _errors(app: FastAPI) -> None:
    @app.exception_handler(FieldError)
    async def field_error(request: Request, e: FieldError) -> JSONResponse:
        loc = ["body"] if e.field == "body" else ["body", e.field]
        return JSONResponse({"detail": [{"loc": loc, "msg": str(e), "type": "value_error"}]}, 422)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, 429, headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(d.get("loc", [])), "msg": f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}",
                    "type": d.get("type", "value_error")} for d in e.errors()]
        return JSONResponse({"detail": details}, 422)


def _auth(app: FastAPI, api_key: str | None) -> None:
    """With ``--api-key K`` every request (the page too) needs ``Authorization: Bearer K``."""
    if not api_key:
        return
    expected = f"Bearer {api_key}".encode()

    @app.middleware("http")
    async def bearer(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse({"detail": "missing or wrong API key: send Authorization: Bearer KEY"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)


async def _body(request: Request) -> Any:
    data = await request.body()
    if len(data) > MAX_BODY:
        raise FieldError("body", f"the request body is over {MAX_BODY >> 20} MB")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FieldError("body", f"body: malformed JSON ({e})") from None


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


# ---------------------------------------------------------------------- AUTOMATIC1111
def _a1111_routes(app: FastAPI, server: Server) -> None:
    async def generate(request: Request, spec, inputs=None, body=None) -> JSONResponse:
        spec = await asyncio.to_thread(server.checked, spec)     # loads the model it names, once
        spec, inputs = await controlnet.attach(server, body, spec, inputs)   # the request's ControlNet units
        job = await asyncio.to_thread(server.submit, spec, _client(request), inputs)
        job = await server.wait(job.id)
        if job.status == "failed":
            return JSONResponse({"error": "GenerationError", "detail": job.error, "errors": job.error}, 500)
        images, infos = await asyncio.to_thread(_results, server, job)
        return JSONResponse({"images": images, "parameters": a1111.parameters(body, spec),
                             "info": a1111.info(spec, infos, server.models.card(spec.model))})

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request) -> JSONResponse:
        body = await _body(request)
        return await generate(request, a1111.spec_from_txt2img(body, server.pipe.defaults), body=body)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request) -> JSONResponse:
        body = await _body(request)
        spec, init, mask = a1111.spec_from_img2img(body, server.pipe.defaults)
        return await generate(request, spec, (init, mask), body=body)

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request) -> dict[str, Any]:
        body = await _body(request)
        image = a1111.decode_image(body.get("image") if isinstance(body, dict) else None, "image")
        return a1111.png_info(image)

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return a1111.schedulers()

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        p = server.progress()
        if not skip_current_image and p.job_id:
            p.want_preview = True     # the worker renders the next step's estimate for the next poll
        active = await asyncio.to_thread(server.queue.active)
        return {"progress": round(p.fraction, 4), "eta_relative": round(p.eta(), 3),
                "state": {"skipped": False, "interrupted": p.job_id in p.cancelled, "job": p.job_id or "",
                          "job_count": active, "job_timestamp": "", "job_no": p.iteration,
                          "sampling_step": p.step, "sampling_steps": p.steps},
                "current_image": None if skip_current_image or not p.job_id else p.preview, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        return {"interrupted": await asyncio.to_thread(server.interrupt)}


def _results(server: Server, job) -> tuple[list[str], list]:
    """A finished job's PNGs as raw base64 (A1111 returns no ``data:`` prefix) and their settings."""
    images = [base64.b64encode(server.store.read(job.id, i)).decode("ascii") for i in range(job.images)]
    return images, server.image_infos(job)


# ---------------------------------------------------------------------- ldm's durable jobs
def _job_routes(app: FastAPI, server: Server) -> None:
    @app.post("/ldm/v1/jobs", status_code=202)
    async def submit(request: Request) -> JSONResponse:
        body = await _body(request)
        spec = await asyncio.to_thread(server.checked, spec_from_job_request(body, server.pipe))
        job = await asyncio.to_thread(server.submit, spec, _client(request))
        return JSONResponse({"id": job.id, "status": job.status, "url": f"/ldm/v1/jobs/{job.id}"}, 202)

    @app.get("/ldm/v1/jobs")
    async def jobs(limit: int = 100) -> dict[str, Any]:
        found = await asyncio.to_thread(server.queue.list, max(1, min(limit, 1000)))
        return {"jobs": [server.job_json(j) for j in found]}

    @app.get("/ldm/v1/jobs/{job_id}")
    async def job(job_id: str) -> JSONResponse:
        found = await asyncio.to_thread(server.queue.get, job_id)
        if found is None:
            return JSONResponse({"detail": f"no job {job_id!r}"}, 404)
        return JSONResponse(server.job_json(found))

    @app.delete("/ldm/v1/jobs/{job_id}")
    async def cancel(job_id: str) -> JSONResponse:
        found = await asyncio.to_thread(server.cancel, job_id)
        if found is None:
            return JSONResponse({"detail": f"no job {job_id!r}"}, 404)
        if found.status in ("done", "failed"):
            return JSONResponse({"detail": f"job {job_id} is already {found.status}", **server.job_json(found)}, 409)
        if found.status == "running":  # it stops at its next sampler step
            found = await server.wait(job_id, timeout=10)
        return JSONResponse(server.job_json(found))

    @app.get("/ldm/v1/images/{name}")
    async def image(name: str) -> Response:
        """An image by id (``JOB-N``): the id is looked up in the queue; the file name is built, not taken."""
        parsed = parse_image_id(name.removesuffix(".png"))
        found = parsed and await asyncio.to_thread(server.queue.get, parsed[0])
        if not found or parsed[1] >= found.images:
            return JSONResponse({"detail": f"no image {name!r}"}, 404)
        data = await asyncio.to_thread(server.store.read, *parsed)
        return Response(data, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="ldm-{name.removesuffix(".png")}.png"',
                                 "Cache-Control": "max-age=31536000, immutable"})

    @app.get("/ldm/v1/info")
    async def info() -> dict[str, Any]:
        return await asyncio.to_thread(server.info)
