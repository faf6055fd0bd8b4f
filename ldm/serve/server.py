"""The running service without its HTTP layer: settings, the loaded pipelines, the queue, the image store, the
workers, and the hand-off between a worker thread and the requests waiting on the event loop.

``Server`` is what the routes in ``ldm.serve.app`` call; it holds no FastAPI types, so it can be tested and
reasoned about on its own. Requests that wait for a result (A1111's synchronous txt2img) do not poll: a worker
calls :meth:`Server.notify` from its thread, which wakes the waiting coroutine through the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.checkpoints.library import open_library
from ldm.pipeline import load_pipeline
from ldm.pipeline.png_info import GenerationInfo
from ldm.samplers import SAMPLERS
from ldm.serve.jobs import ACTIVE, Job, JobQueue, QueueFull
from ldm.serve.models import ModelPool
from ldm.serve.spec import FieldError, JobSpec, Limits, check
from ldm.serve.store import ImageStore, image_id
from ldm.serve.worker import Worker

FINAL = ("done", "failed", "cancelled")
WAKE_CHECK_S = 1.0  # a waiter re-reads its job this often even without a wake-up


@dataclass(frozen=True)
class ServeSettings:
    """``ldm serve``'s flags."""

    model: str | None = None           # None: the shipped default model
    host: str = "127.0.0.1"
    port: int = 7860
    data: str = "ldm-serve"
    api_key: str | None = None
    max_queue: int = 100
    max_size: int = 1024
    max_steps: int = 150
    devices: tuple[str | None, ...] = (None,)   # one worker per device; None: the pipeline's default (CPU)
    dtype: str | None = None
    vae: str | None = None             # a VAE swapped into every pipeline (Pipeline.load_vae)
    control_dir: str | None = None     # the ControlNet / T2I-Adapter files units name (ldm.serve.controlnet)
    models_dir: str | None = None      # the models folder clients pick models from (None: $LDM_MODELS_DIR)


class Server:
    def __init__(self, settings: ServeSettings, pipes: list | None = None):
        """Loads one pipeline per device (or takes ``pipes``), opens ``--data`` and re-queues what a killed
        server left running. Workers start with :meth:`start` (the app's start-up)."""
        self.settings = settings
        self.limits = Limits(settings.max_size, settings.max_steps)
        data = Path(settings.data)
        self.queue = JobQueue(data, settings.max_queue)
        self.store = ImageStore(data)
        self.recovered = self.queue.recover()
        library = open_library(settings.models_dir)
        pipes = pipes or [load_pipeline(settings.model, device=d, dtype=settings.dtype, models_dir=library)
                          for d in settings.devices]
        if settings.vae:
            pipes = [p.load_vae(settings.vae) for p in pipes]
        self.pipe = pipes[0]  # the startup model's defaults fill requests (pipe.request reads configs only)
        self.models = ModelPool(settings, pipes, library)   # the models a job may name (ldm.serve.models)
        self.workers = [Worker(p, self.queue, self.store, self.notify, str(p.device), self.models) for p in pipes]
        self.options: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}

    # ------------------------------------------------------------------ life cycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            if worker.is_alive():
                worker.join(timeout=5)

    # ------------------------------------------------------------------ jobs
    def checked(self, spec: JobSpec) -> JobSpec:
        """``spec`` with its model resolved (the one it asks for, else the current one: a library name, or None for
        the startup model) and checked against that model, which is loaded now if it is not yet (blocking: call
        it off the event loop). A model that cannot be named or loaded is a FieldError."""
        field = spec.field_name("model")
        model = self.models.current if spec.model is None else self.models.name_for(spec.model, field)
        try:
            pipe = self.models.get(model, self.pipe)
        except (ValueError, OSError) as e:
            raise FieldError(field, f"{field} {spec.model!r} cannot be loaded: {' '.join(str(e).split())}") from None
        return check(dataclasses.replace(spec, model=model), self.limits, pipe)

    def submit(self, spec: JobSpec, client: str, inputs: tuple | None = None) -> Job:
        """Queue a checked spec (its img2img inputs stored first); QueueFull if the queue is full."""
        if inputs is not None:
            job_id = self.queue.new_id()
            self.store.save_inputs(job_id, *inputs)
            try:
                job = self.queue.submit(spec, client, job_id)
            except QueueFull:
                self.store.remove_inputs(job_id)
                raise
        else:
            job = self.queue.submit(spec, client)
        for worker in self.workers:
            worker.wake()
        return job

    def cancel(self, job_id: str) -> Job | None:
        job = self.queue.cancel(job_id)
        if job is not None and job.status == "running":
            for worker in self.workers:
                worker.cancel(job_id)
        return job

    def interrupt(self) -> int:
        """A1111's interrupt: stop whatever runs now; returns how many jobs were asked to stop."""
        stopped = 0
        for worker in self.workers:
            job_id = worker.progress.job_id
            if job_id is not None and self.queue.cancel(job_id) is not None:
                stopped += worker.cancel(job_id)
        return stopped

    def notify(self, job_id: str) -> None:
        """Called from a worker thread when a job changes; wakes whoever waits for it on the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._set, job_id)

    def _set(self, job_id: str) -> None:
        event = self._events.get(job_id)
        if event is not None:
            event.set()

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it is done, failed or cancelled (or when ``timeout`` runs out)."""
        event = self._events.setdefault(job_id, asyncio.Event())
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        try:
            while True:
                job = await asyncio.to_thread(self.queue.get, job_id)
                if job is None or job.status in FINAL:
                    return job
                if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                    return job
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), WAKE_CHECK_S)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._events.pop(job_id, None)

    def progress(self):
        """The progress of the first busy worker (A1111 reports one job at a time), else an idle one's."""
        return next((w.progress for w in self.workers if w.progress.job_id), self.workers[0].progress)

    # ------------------------------------------------------------------ what the API shows
    def job_json(self, job: Job) -> dict[str, Any]:
        """``GET /ldm/v1/jobs/ID``: status, the URLs of the finished images, the error, the settings, and
        while it runs its step progress."""
        spec = job.spec
        body: dict[str, Any] = {
            "id": job.id, "status": job.status, "error": job.error,
            "images": [f"/ldm/v1/images/{image_id(job.id, i)}" for i in range(job.images)],
            "seeds": [spec.seed + i for i in range(spec.count)], "count": spec.count,
            "settings": settings_json(spec), "created": job.created, "started": job.started,
            "finished": job.finished, "api": spec.api,
        }
        if job.status == "running":
            p = next((w.progress for w in self.workers if w.progress.job_id == job.id), None)
            if p is not None:
                body["progress"] = {"step": p.step, "steps": p.steps, "iteration": p.iteration,
                                    "iterations": p.iterations, "fraction": round(p.fraction, 4)}
        return body

    def image_infos(self, job: Job) -> list[GenerationInfo]:
        return [self.store.info(job.id, i) for i in range(job.images)]

    def model_card(self) -> dict[str, Any]:
        """The model new requests get, as A1111's ``/sd-models`` lists one (``ModelPool.card``)."""
        return self.models.card(self.models.current)

    def info(self) -> dict[str, Any]:
        """``GET /ldm/v1/info``: what the web page needs to draw its form."""
        from ldm.pipeline.png_info import A1111_SAMPLERS

        defaults = self.pipe.request("x", seed=0)
        return {"model": self.model_card(), "samplers": [{"name": s, "label": A1111_SAMPLERS.get(s, s)}
                                                        for s in SAMPLERS],
                "defaults": {"steps": defaults.steps, "guidance": defaults.guidance, "width": defaults.width,
                             "height": defaults.height, "sampler": self.pipe.defaults.get("sampler", "dpmpp_2m")},
                "limits": dataclasses.asdict(self.limits) | {"max_queue": self.settings.max_queue},
                "size_multiple": max(8, self.pipe.vae_scale_factor), "queue": self.queue.active(),
                "workers": len(self.workers), "statuses": list(ACTIVE + FINAL)}


def settings_json(spec: JobSpec) -> dict[str, Any]:
    """A job's settings under the job API's names (a prompt-file line's keys and ``num``)."""
    return {"prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": spec.seed, "steps": spec.steps,
            "guidance": spec.guidance, "sampler": spec.sampler, "width": spec.width, "height": spec.height,
            "num": spec.count, "spacing": spec.spacing, "mode": spec.mode, "strength": spec.strength,
            "model": spec.model}
