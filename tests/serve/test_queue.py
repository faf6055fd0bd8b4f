"""The SQLite job queue on its own: fair order across clients, the --max-queue bound, cancel, recovery."""

from __future__ import annotations

import pytest

from ldm.serve.jobs import JobQueue, QueueFull
from ldm.serve.spec import JobSpec


def spec(prompt: str) -> JobSpec:
    return JobSpec(prompt=prompt, seed=1, steps=2, guidance=3.0, sampler="euler", width=64, height=64)


def drain(queue: JobQueue) -> list[str]:
    order = []
    while (job := queue.claim()) is not None:
        order.append(job.spec.prompt)
        queue.finish(job.id, "done", 1)
    return order


def test_the_client_served_least_recently_goes_first(tmp_path):
    queue = JobQueue(tmp_path)
    for prompt in ("a1", "a2", "a3"):
        queue.submit(spec(prompt), "client-a")
    queue.submit(spec("b1"), "client-b")
    queue.submit(spec("c1"), "client-c")
    assert drain(queue) == ["a1", "b1", "c1", "a2", "a3"]


def test_full_queue_refuses_and_frees_up_as_jobs_end(tmp_path):
    queue = JobQueue(tmp_path, max_queue=2)
    first = queue.submit(spec("x"), "c")
    queue.submit(spec("y"), "c")
    with pytest.raises(QueueFull, match="--max-queue 2"):
        queue.submit(spec("z"), "c")
    assert queue.cancel(first.id).status == "cancelled"
    queue.submit(spec("z"), "c")
    assert queue.active() == 2


def test_recovery_requeues_running_jobs_in_their_place_and_honours_cancels(tmp_path):
    queue = JobQueue(tmp_path)
    a, b, c = (queue.submit(spec(p), "c") for p in ("a", "b", "c"))
    assert queue.claim().id == a.id and queue.claim().id == b.id
    queue.cancel(b.id)  # b was running: flagged, not yet stopped
    queue.close()
    reopened = JobQueue(tmp_path)  # as after SIGKILL: same file, new process
    assert reopened.recover() == 1
    assert [reopened.get(j.id).status for j in (a, b, c)] == ["queued", "cancelled", "queued"]
    assert drain(reopened) == ["a", "c"]
    assert reopened.get(a.id).spec == a.spec
