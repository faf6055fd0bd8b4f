"""A1111's routes about models: what the models folder holds (``/sd-models``, ``/loras``, ``/sd-vae``,
``/embeddings``, the ``refresh-*`` rescans) and switching the model (``/options``); the pool behind them is
``ldm.serve.models``. Loading a model blocks, so it runs on a thread, never on the event loop."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request

from ldm.serve import a1111
from ldm.serve.server import Server
from ldm.serve.spec import FieldError

REFRESH = ("refresh-checkpoints", "refresh-loras", "refresh-vae", "refresh-embeddings")


def model_routes(app: FastAPI, server: Server, body) -> None:
    """``body``: the app's JSON body reader (size limit, 422 on malformed JSON)."""
    models = server.models

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return await asyncio.to_thread(models.cards)

    @app.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        return await asyncio.to_thread(models.loras)

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae() -> list[dict[str, Any]]:
        return await asyncio.to_thread(models.vaes)

    @app.get("/sdapi/v1/embeddings")
    async def embeddings() -> dict[str, Any]:
        return await asyncio.to_thread(models.embeddings, models.current)

    for name in REFRESH:
        app.post(f"/sdapi/v1/{name}", name=name)(_refresh(models))

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        card = await asyncio.to_thread(server.model_card)
        return {"sd_model_checkpoint": card["title"], "sd_checkpoint_hash": card["hash"], "samples_format": "png",
                "eta_ddim": 0.0, "eta_ancestral": 1.0, "CLIP_stop_at_last_layers": 1,
                "sd_vae": a1111.vae_option(server.pipe), **server.options}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> None:
        given = await body(request)
        if not isinstance(given, dict):
            raise FieldError("body", "options must be a JSON object")
        a1111.check_vae_option(server.pipe, given.get("sd_vae"))
        if given.get("sd_model_checkpoint") is not None:
            await asyncio.to_thread(models.switch, given["sd_model_checkpoint"])
        server.options.update({k: v for k, v in given.items() if k not in ("sd_model_checkpoint", "sd_vae")})


def _refresh(models):
    async def refresh() -> None:
        await asyncio.to_thread(models.refresh)
    return refresh
