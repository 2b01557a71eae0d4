"""Dynamic batching: many concurrent requests, one model, one worker thread.

Requests become `Job`s in a bounded queue. A single worker thread owns the model (its caches and
compiled steps are not safe to share between threads) and loops:

    take the oldest job  ->  add queued jobs with the same `key` while the batch has room,
    waiting at most `batch_wait_ms` for more to arrive  ->  run them as ONE batch  ->
    hand each job its slice of the outputs through its future

A job's `key` says which jobs can share a batch (e.g. the same sampling settings); its `rows` are
its batch rows (e.g. one per image). Jobs are never split, so a job must fit in one batch. The
oldest job always starts the next batch, so no job waits behind newer ones for more than one batch.

Cancellation: a job whose future is cancelled before its batch starts is dropped from the queue
(its rows are never computed). Once a batch has started it runs to completion — the sampler has
no way to stop single rows — and the outputs of cancelled jobs are thrown away.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

# run_batch(key, rows) -> one output per row, in order
RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]


class QueueFull(Exception):
    """The queue cannot take the job now; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class BatcherStopped(Exception):
    """The batcher was stopped before the job ran."""


@dataclass
class JobResult:
    """What a job gets back: its outputs and where its time went."""

    outputs: list[Any]
    queue_s: float  # submitted -> its batch started
    run_s: float  # the whole batch's run time
    batch_rows: int  # rows in the batch it ran in (its own and others')


@dataclass(eq=False)
class Job:
    key: Hashable
    rows: list[Any]
    future: Future = field(default_factory=Future)  # -> JobResult
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queue jobs from any thread; run them in batches on one worker thread.

    From asyncio: `await asyncio.wrap_future(batcher.submit(key, rows).future)`; cancelling that
    await cancels the job.

    `max_batch_size`: most rows per batch. `max_queue`: most rows waiting (not yet running);
    a job that would exceed it raises `QueueFull`. `batch_wait_ms`: how long a batch that is not
    full waits for more jobs after its first one.
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int = 8, max_queue: int = 64,
                 batch_wait_ms: float = 10.0, name: str = "mars-batcher") -> None:
        if max_batch_size < 1 or max_queue < max_batch_size or batch_wait_ms < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= max_batch_size and batch_wait_ms >= 0, "
                             f"got {max_batch_size}, {max_queue}, {batch_wait_ms}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_ms / 1000
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._seconds_per_batch = 1.0  # running estimate, for Retry-After
        self.batches_run = 0

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the running batch, fail the queued jobs with `BatcherStopped`, end the thread."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._queued_rows = 0
            self._cond.notify_all()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(BatcherStopped("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- submitting -----------------------------------------------------------------------------
    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def submit(self, key: Hashable, rows: list[Any]) -> Job:
        """Queue a job (thread-safe). Raises QueueFull, or ValueError if it can never fit a batch."""
        if not 1 <= len(rows) <= self.max_batch_size:
            raise ValueError(f"a job needs 1 to {self.max_batch_size} rows, got {len(rows)}")
        job = Job(key, list(rows))
        with self._cond:
            if self._stopping:
                raise BatcherStopped("the server is shutting down")
            if self._queued_rows + len(rows) > self.max_queue:
                raise QueueFull(self._retry_after(self._queued_rows + len(rows)))
            self._queue.append(job)
            self._queued_rows += len(rows)
            self._cond.notify_all()
        job.future.add_done_callback(self._forget_if_cancelled)
        return job

    def _retry_after(self, rows: int) -> int:
        """Seconds until about `rows` queued rows have been worked off (at least 1)."""
        return max(1, math.ceil(math.ceil(rows / self.max_batch_size) * self._seconds_per_batch))

    def _forget_if_cancelled(self, future: Future) -> None:
        """Drop a cancelled job from the queue at once, so it stops counting against max_queue."""
        if not future.cancelled():
            return
        with self._cond:
            for job in self._queue:
                if job.future is future:
                    self._queue.remove(job)
                    self._queued_rows -= len(job.rows)
                    break

    # --- the worker -----------------------------------------------------------------------------
    def _take(self, job: Job) -> bool:
        """Move `job` from the queue into a batch (lock held); False if it was cancelled."""
        self._queue.remove(job)
        self._queued_rows -= len(job.rows)
        return job.future.set_running_or_notify_cancel()  # after this, cancel() is refused

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is ready; None once stopping."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._queue[0]
                if self._take(first):
                    break
            batch, rows = [first], len(first.rows)
            deadline = time.monotonic() + self.batch_wait_s
            while rows < self.max_batch_size and not self._stopping:
                for job in list(self._queue):  # oldest first; jobs that do not fit stay queued
                    if job.key == first.key and rows + len(job.rows) <= self.max_batch_size:
                        if self._take(job):
                            batch.append(job)
                            rows += len(job.rows)
                remaining = deadline - time.monotonic()
                if rows >= self.max_batch_size or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        rows = [row for job in batch for row in job.rows]
        start = time.perf_counter()
        try:
            outputs = list(self.run_batch(batch[0].key, rows))
            if len(outputs) != len(rows):
                raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(rows)} rows")
        except BaseException as err:  # every job of the batch learns why; the worker lives on
            for job in batch:
                job.future.set_exception(err)
            return
        run_s = time.perf_counter() - start
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * run_s if self.batches_run else run_s
        self.batches_run += 1
        offset = 0
        for job in batch:
            n = len(job.rows)
            job.future.set_result(JobResult(outputs[offset:offset + n], start - job.submitted, run_s, len(rows)))
            offset += n
