"""``ldm serve``: an AUTOMATIC1111-compatible HTTP API, ldm's durable job queue, and a web page.

    ldm serve                      # then open http://127.0.0.1:7860

  spec       what one job draws (JobSpec), the server's limits, checks shared by both APIs (FieldError -> 422)
  a1111      A1111's request fields -> JobSpec, A1111's response shapes, sampler and scheduler names
  jobs       the durable queue: one SQLite table that survives SIGKILL; fair order across clients
  store      the image files: atomic PNG writes and a crash-safe manifest per job (batch's machinery)
  worker     one generation thread per device; resumes a killed job with byte-identical images
  server     the service without HTTP: pipelines, queue, store, workers, waking waiting requests
  models     the models a job may name (--models-dir), loaded once and kept while memory allows; A1111's listings
  model_routes  A1111's model routes: sd-models, loras, sd-vae, embeddings, refresh-*, options (model switch)
  app        the FastAPI routes, errors, the --api-key check, the page's files
  static/    index.html, app.js, style.css: plain files, no build step, nothing from a CDN

Imports: ``ldm.pipeline``, ``ldm.batch`` (prompt-line checks, manifest), ``ldm.files`` and the diffusion math;
never ``cli``. FastAPI and uvicorn (the ``serve`` extra) are needed by ``app`` only.
"""

from ldm.serve.server import Server, ServeSettings
from ldm.serve.spec import FieldError, JobSpec, Limits

__all__ = ["FieldError", "JobSpec", "Limits", "ServeSettings", "Server"]
