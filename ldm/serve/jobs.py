"""The durable job queue: one SQLite table (stdlib ``sqlite3``) in ``--data``, that survives SIGKILL.

Every state change is one transaction committed with ``synchronous=FULL`` in WAL mode, so once ``submit``
returns (and the client gets its 202) the job is on disk. A job moves ``queued -> running -> done | failed |
cancelled``; a server that dies leaves its jobs ``queued`` or ``running``, and :meth:`JobQueue.recover` puts the
running ones back in the queue at start-up, ahead of nothing else (they keep their place: ``seq``). What makes a
re-run job produce each image exactly once is the image store's manifest (``ldm.serve.store``), not this table.

Fairness: the next job is the oldest queued job of the client who was served least recently, so one client
with fifty jobs does not hold up another's single one (clients are told apart by address, or API key).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ldm.serve.spec import JobSpec

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
FILE = "jobs.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    id       TEXT UNIQUE NOT NULL,
    client   TEXT NOT NULL,
    spec     TEXT NOT NULL,
    status   TEXT NOT NULL,
    error    TEXT,
    images   INTEGER NOT NULL DEFAULT 0,
    cancel   INTEGER NOT NULL DEFAULT 0,
    created  REAL NOT NULL,
    started  REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, client, seq);
"""
# The oldest queued job of each client; of those, the client whose latest start is oldest goes first.
_NEXT = """
SELECT j.id FROM jobs j
WHERE j.status = 'queued' AND j.cancel = 0
  AND j.seq = (SELECT MIN(seq) FROM jobs WHERE status = 'queued' AND cancel = 0 AND client = j.client)
ORDER BY (SELECT COALESCE(MAX(started), 0) FROM jobs WHERE client = j.client AND started IS NOT NULL), j.seq
LIMIT 1
"""


class QueueFull(Exception):
    """The queue holds --max-queue unfinished jobs; the app answers 429."""


@dataclass(frozen=True)
class Job:
    id: str
    seq: int
    client: str
    spec: JobSpec
    status: str
    error: str | None
    images: int       # how many images are finished
    cancel: bool      # a cancel was asked for while it ran
    created: float
    started: float | None
    finished: float | None


class JobQueue:
    """Thread-safe (one connection behind a lock: the event loop's threads and the workers share it)."""

    def __init__(self, folder: str | Path, max_queue: int = 100):
        self.path = Path(folder) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _rows(self, sql: str, args: tuple = ()) -> list[Job]:
        with self._lock:
            return [_job(r) for r in self._db.execute(sql, args).fetchall()]

    # ------------------------------------------------------------------ clients' side
    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def submit(self, spec: JobSpec, client: str, job_id: str | None = None) -> Job:
        """Queue a job (durably) and return it; QueueFull when --max-queue jobs are unfinished."""
        job_id = job_id or self.new_id()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                active = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
                                          ).fetchone()[0]
                if active >= self.max_queue:
                    raise QueueFull(f"the queue is full ({active} unfinished jobs, --max-queue {self.max_queue}); "
                                    "try again later")
                self._db.execute("INSERT INTO jobs (id, client, spec, status, created) VALUES (?, ?, ?, 'queued', ?)",
                                 (job_id, client, spec.to_json(), time.time()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        rows = self._rows("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def list(self, limit: int = 100, statuses: tuple[str, ...] = STATUSES) -> list[Job]:
        """The newest ``limit`` jobs with one of ``statuses``, oldest first."""
        marks = ", ".join("?" * len(statuses))
        rows = self._rows(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY seq DESC LIMIT ?",
                          (*statuses, limit))
        return rows[::-1]

    def active(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0]

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one is flagged for its worker to stop at the next step."""
        self._write("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
                    (time.time(), job_id))
        self._write("UPDATE jobs SET cancel = 1 WHERE id = ? AND status = 'running'", (job_id,))
        return self.get(job_id)

    # ------------------------------------------------------------------ workers' side
    def cancel_requested(self, job_id: str) -> bool:
        job = self.get(job_id)
        return job is None or job.cancel
    def claim(self) -> Job | None:
        """Take the next job (see the module docstring) and mark it running; None when nothing is queued."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(_NEXT).fetchone()
                if row is not None:
                    self._db.execute("UPDATE jobs SET status = 'running', started = ? WHERE id = ?",
                                     (time.time(), row["id"]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else self.get(row["id"])

    def progress(self, job_id: str, images: int) -> None:
        self._write("UPDATE jobs SET images = ? WHERE id = ?", (images, job_id))

    def finish(self, job_id: str, status: str, images: int, error: str | None = None) -> None:
        """Record a running job's end: done, failed (with its error) or cancelled."""
        if status not in ("done", "failed", "cancelled"):
            raise ValueError(f"a job cannot finish as {status!r}")
        self._write("UPDATE jobs SET status = ?, images = ?, error = ?, finished = ? WHERE id = ?",
                    (status, images, error, time.time(), job_id))

    def recover(self) -> int:
        """At start-up: jobs a killed server left running go back to the queue (a cancel asked for then holds)."""
        self._write("UPDATE jobs SET status = 'cancelled', finished = ? WHERE status = 'running' AND cancel = 1",
                    (time.time(),))
        return self._write("UPDATE jobs SET status = 'queued' WHERE status = 'running'")


def _job(row: sqlite3.Row) -> Job:
    return Job(id=row["id"], seq=row["seq"], client=row["client"], spec=JobSpec.from_json(row["spec"]),
               status=row["status"], error=row["error"], images=row["images"], cancel=bool(row["cancel"]),
               created=row["created"], started=row["started"], finished=row["finished"])
