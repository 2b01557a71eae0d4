"""The batcher alone, with a recording `run_batch`: grouping, limits, cancellation, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from mars.serve.batcher import Batcher, BatcherStopped, QueueFull


class Recorder:
    """run_batch that records each batch and can hold the worker inside a batch until released."""

    def __init__(self) -> None:
        self.batches: list[tuple[object, list]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, key, rows):
        self.batches.append((key, list(rows)))
        self.entered.set()
        assert self.release.wait(10), "test never released the worker"
        if key == "boom":
            raise RuntimeError("model failed")
        return [f"{key}:{row}" for row in rows]

    def hold(self) -> None:
        self.release.clear()
        self.entered.clear()


@pytest.fixture
def recorder():
    return Recorder()


def make(recorder, **kw) -> Batcher:
    batcher = Batcher(recorder, **{"max_batch_size": 4, "max_queue": 8, "batch_wait_ms": 5, **kw})
    batcher.start()
    return batcher


def occupy_worker(batcher: Batcher, recorder: Recorder):
    """Start a batch that blocks, so later jobs pile up in the queue deterministically."""
    recorder.hold()
    job = batcher.submit("gate", ["g"])
    assert recorder.entered.wait(5)
    return job


def test_compatible_jobs_share_a_batch_and_get_their_own_outputs(recorder):
    batcher = make(recorder)
    gate = occupy_worker(batcher, recorder)
    a = batcher.submit("x", ["a0"])
    y = batcher.submit("y", ["y0"])  # other settings: must not join the x batch
    b = batcher.submit("x", ["b0", "b1"])
    recorder.release.set()
    assert a.future.result(5).outputs == ["x:a0"]
    assert b.future.result(5).outputs == ["x:b0", "x:b1"]
    assert y.future.result(5).outputs == ["y:y0"]
    assert gate.future.result(5).outputs == ["gate:g"]
    assert recorder.batches[1:] == [("x", ["a0", "b0", "b1"]), ("y", ["y0"])]
    assert b.future.result().batch_rows == 3 and y.future.result().batch_rows == 1
    assert a.future.result().queue_s > 0
    batcher.stop()


def test_batches_never_exceed_max_batch_size_and_jobs_are_not_split(recorder):
    batcher = make(recorder, max_batch_size=4, max_queue=16)
    occupy_worker(batcher, recorder)
    jobs = [batcher.submit("x", [f"{i}.{j}" for j in range(size)]) for i, size in enumerate([3, 2, 1, 4, 2])]
    recorder.release.set()
    for job in jobs:
        assert job.future.result(5).outputs == [f"x:{row}" for row in job.rows]
    sizes = [len(rows) for _, rows in recorder.batches[1:]]
    assert all(s <= 4 for s in sizes) and sum(sizes) == 12
    # the oldest job always opens a batch; a smaller later job may fill the room it leaves
    assert [rows for _, rows in recorder.batches[1:]] == [["0.0", "0.1", "0.2", "2.0"], ["1.0", "1.1", "4.0", "4.1"],
                                                          ["3.0", "3.1", "3.2", "3.3"]]
    batcher.stop()


def test_batch_waits_for_more_jobs_at_most_batch_wait(recorder):
    batcher = make(recorder, batch_wait_ms=500)
    start = time.perf_counter()
    first = batcher.submit("x", ["a"])
    time.sleep(0.05)
    second = batcher.submit("x", ["b"])  # arrives while the first waits for company
    assert first.future.result(5).batch_rows == 2 and second.future.result(5).batch_rows == 2
    alone = batcher.submit("x", ["c"])
    assert alone.future.result(5).batch_rows == 1
    assert time.perf_counter() - start < 3.0  # two waits of 0.5 s, not a hang
    batcher.stop()


def test_cancelled_job_is_dropped_before_it_runs(recorder):
    batcher = make(recorder)
    occupy_worker(batcher, recorder)
    doomed = batcher.submit("x", ["doomed0", "doomed1"])
    kept = batcher.submit("x", ["kept"])
    assert batcher.queued_rows == 3
    assert doomed.future.cancel()
    assert batcher.queued_rows == 1  # freed at once, not when the worker gets there
    recorder.release.set()
    assert kept.future.result(5).outputs == ["x:kept"]
    assert all("doomed0" not in rows for _, rows in recorder.batches)
    batcher.stop()


def test_cancel_during_a_batch_finishes_the_batch_and_drops_the_result(recorder):
    batcher = make(recorder)
    job = occupy_worker(batcher, recorder)
    assert not job.future.cancel()  # already running: cannot be cancelled
    recorder.release.set()
    assert job.future.result(5).outputs == ["gate:g"]
    after = batcher.submit("x", ["next"])
    assert after.future.result(5).outputs == ["x:next"]
    batcher.stop()


def test_full_queue_raises_with_a_retry_after(recorder):
    batcher = make(recorder, max_batch_size=2, max_queue=3)
    occupy_worker(batcher, recorder)
    batcher.submit("x", ["a", "b"])
    batcher.submit("x", ["c"])
    with pytest.raises(QueueFull) as full:
        batcher.submit("x", ["d"])
    assert full.value.retry_after >= 1
    recorder.release.set()
    batcher.stop()


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on(recorder):
    batcher = make(recorder)
    occupy_worker(batcher, recorder)
    bad1, bad2 = batcher.submit("boom", ["1"]), batcher.submit("boom", ["2"])
    good = batcher.submit("x", ["ok"])
    recorder.release.set()
    for bad in (bad1, bad2):
        with pytest.raises(RuntimeError, match="model failed"):
            bad.future.result(5)
    assert good.future.result(5).outputs == ["x:ok"]
    batcher.stop()


def test_stop_fails_queued_jobs_and_refuses_new_ones(recorder):
    batcher = make(recorder)
    running = occupy_worker(batcher, recorder)
    queued = batcher.submit("x", ["a"])
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    with pytest.raises(BatcherStopped):
        queued.future.result(5)
    recorder.release.set()
    stopper.join(5)
    assert running.future.result(5).outputs == ["gate:g"]  # the running batch finished
    with pytest.raises(BatcherStopped):
        batcher.submit("x", ["late"])


def test_job_sizes_must_fit_a_batch(recorder):
    batcher = make(recorder, max_batch_size=2)
    for rows in ([], ["a", "b", "c"]):
        with pytest.raises(ValueError, match="1 to 2 rows"):
            batcher.submit("x", rows)
    batcher.stop()
    with pytest.raises(ValueError):
        Batcher(recorder, max_batch_size=4, max_queue=2)


def test_awaiting_from_asyncio_and_cancelling_the_awaiting_task(recorder):
    batcher = make(recorder)

    async def run(key, rows):
        return await asyncio.wrap_future(batcher.submit(key, rows).future)

    async def scenario():
        assert (await run("x", ["a"])).outputs == ["x:a"]
        occupy_worker(batcher, recorder)
        task = asyncio.ensure_future(run("x", ["gone"]))
        await asyncio.sleep(0.01)
        assert batcher.queued_rows == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)  # the cancel reaches the job through the loop
        assert batcher.queued_rows == 0

    asyncio.run(scenario())
    recorder.release.set()
    batcher.stop()
    assert all("gone" not in rows for _, rows in recorder.batches)
