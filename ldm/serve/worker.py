"""One generation worker per device: a thread that owns a Pipeline and draws queued jobs, off the event loop.

A job's images are drawn ``batch_size`` at a time (one forward pass per A1111 ``n_iter``), with seeds seed,
seed+1, ... in order. A re-run job (after a restart) skips the passes whose images are all finished and redraws a
partly finished pass whole, writing only its missing images: every image is computed in the same company as in
an uninterrupted run (GPU kernels are not bit-identical across batch sizes; ``ldm batch`` does the same), so a
SIGKILL costs time, never different bytes.

Cancelling (``DELETE /ldm/v1/jobs/ID``, ``/sdapi/v1/interrupt``) is seen at the next sampler step: the step
callback raises, the pass is abandoned, the job ends ``cancelled`` with the images finished before it.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from ldm.pipeline.vae_swap import preview_images
from ldm.serve import controlnet
from ldm.serve.jobs import Job, JobQueue
from ldm.serve.spec import JobSpec
from ldm.serve.store import ImageStore

IDLE_POLL_S = 0.5  # a worker also wakes on its own this often, in case a wake-up was missed


class Cancelled(Exception):
    """The running job was cancelled or interrupted."""


@dataclass
class Progress:
    """What a worker is doing now (read by ``/sdapi/v1/progress`` and the job API; written by the worker)."""

    job_id: str | None = None
    step: int = 0
    steps: int = 0
    iteration: int = 0
    iterations: int = 0
    started: float = 0.0
    cancelled: set[str] = field(default_factory=set)
    # live preview: a client asks (``want_preview``), the worker renders the next step's x0 estimate as a base64
    # PNG (``ldm.pipeline.vae_swap.preview_images``: TAESD when loaded, else the linear approximation)
    want_preview: bool = False
    preview: str | None = None

    @property
    def fraction(self) -> float:
        total = self.steps * self.iterations
        return (self.iteration * self.steps + self.step) / total if total else 0.0

    def eta(self) -> float:
        """Seconds left, extrapolated from the time so far."""
        done = self.fraction
        elapsed = time.monotonic() - self.started
        return elapsed / done - elapsed if done > 0 else 0.0


class Worker(threading.Thread):
    def __init__(self, pipe, queue: JobQueue, store: ImageStore, notify: Callable[[str], None], name: str = "cpu",
                 models=None):
        super().__init__(name=f"ldm-worker-{name}", daemon=True)
        self.pipe, self.queue, self.store, self.notify = pipe, queue, store, notify
        self.home, self.models = pipe, models   # the device's startup pipeline; the ModelPool a job's model comes from
        self.progress = Progress()
        self._wake = threading.Event()
        self._halt = threading.Event()   # (not _stop: threading.Thread has a _stop method, which join() calls)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    def cancel(self, job_id: str | None = None) -> bool:
        """Stop ``job_id`` (None: whatever runs now) at its next step; True if this worker runs it."""
        current = self.progress.job_id
        if current is not None and job_id in (None, current):
            self.progress.cancelled.add(current)
            return True
        return False

    def run(self) -> None:
        while not self._halt.is_set():
            job = self.queue.claim()
            if job is None:
                self._wake.wait(IDLE_POLL_S)
                self._wake.clear()
                continue
            self.notify(job.id)
            self.process(job)
            self.notify(job.id)

    def process(self, job: Job) -> None:
        """Draw a job's missing images and record how it ended; never raises (a bad job must not stop the
        worker)."""
        spec = job.spec
        done = self.store.finished(job.id)
        self.progress = Progress(job.id, 0, spec.steps or 0, 0, spec.n_iter, time.monotonic())
        try:
            self.pipe = self.home if self.models is None else self.models.get(spec.model, self.home)
            for it in range(spec.n_iter):
                self.progress.iteration, self.progress.step = it, 0
                indices = range(it * spec.batch_size, (it + 1) * spec.batch_size)
                if all(i in done for i in indices):
                    continue
                if self.queue.cancel_requested(job.id):  # asked for before this worker saw the job
                    raise Cancelled(job.id)
                for i, image in zip(indices, self.draw(job, spec, it)):
                    if i not in done:
                        self.store.write(job.id, i, image)
                        done.add(i)
                self.queue.progress(job.id, len(done))
            self.queue.finish(job.id, "done", len(done))
        except Cancelled:
            self.queue.finish(job.id, "cancelled", len(done), "cancelled")
        except Exception as e:  # noqa: BLE001 - any failure is the job's, reported in its record
            self.queue.finish(job.id, "failed", len(done), _one_line(e))
        finally:
            self.progress = Progress()

    def draw(self, job: Job, spec: JobSpec, iteration: int) -> list:
        """One pass: ``batch_size`` images with their metadata in ``image.info``."""
        seeds = [spec.seed + iteration * spec.batch_size + k for k in range(spec.batch_size)]
        options = {"negative_prompt": spec.negative_prompt, "steps": spec.steps, "guidance": spec.guidance,
                   "sampler": spec.sampler, "height": spec.height, "width": spec.width, "seed": seeds,
                   "num_images_per_prompt": spec.batch_size, "eta": spec.eta, "spacing": spec.spacing,
                   "callback": self._on_step, "progress": False}
        if spec.control:   # ControlNet units; their images are among the job's stored inputs
            images = self.store.control_images(job.id, len(spec.control))
            options["control"] = controlnet.controls(self.pipe, spec, images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a long prompt's warning has nowhere to go; the PNG keeps the text
            if spec.mode == "txt2img":
                return self.pipe(spec.prompt, **options)
            init, mask = self.store.inputs(job.id)
            if spec.mode == "inpaint":
                return self.pipe.inpaint(spec.prompt, init, mask, strength=spec.strength, **options)
            return self.pipe.img2img(spec.prompt, init, strength=spec.strength, **options)

    def _on_step(self, info: dict) -> None:
        if self.progress.job_id in self.progress.cancelled:
            raise Cancelled(self.progress.job_id)
        self.progress.step, self.progress.steps = info["i"] + 1, info["steps"]
        if self.progress.want_preview:
            self.progress.want_preview = False
            images = preview_images(self.pipe, info["denoised"][:1])
            self.progress.preview = _png_base64(images[0]) if images else None


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}" if not isinstance(error, (ValueError, FloatingPointError)) else text
