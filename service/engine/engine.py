"""The batching engine of one model version.

One asyncio task owns the waiting queue and the set of active sources; one worker thread
owns the onnxruntime sessions and the :class:`DecodeBatch`. The task decides who joins and
who is dropped (pure :mod:`service.engine.scheduler`), hops to the worker once, and the worker
runs decoder steps until a source finishes or new work arrives; then the task answers the
finished sources at once and admits the waiting ones at the next step.

Two batching modes: ``step`` (sources join the running batch at the next decoder step and
leave the moment they finish) and ``request`` (collect up to ``max_batch`` sources or
``max_wait_ms``, then decode that batch to the end before admitting more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.engine.batch import DecodeBatch, Job
from service.engine.scheduler import EngineSettings, Waiting, choose_admissions, expired
from service.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from service.metrics import Metrics
from service.runtime.bundle import Bundle

log = logging.getLogger(__name__)

MAX_STEPS_PER_HOP = 256  # the worker returns to the event loop at least this often


@dataclass(eq=False)
class Pending:
    job: Job
    future: asyncio.Future[Job]
    enqueued: float
    deadline: float | None
    cancelled: bool = False

    def waiting(self) -> Waiting:
        return Waiting(rows=self.job.k, enqueued=self.enqueued, deadline=self.deadline, cancelled=self.cancelled)


@dataclass
class WorkResult:
    finished: list[Job] = field(default_factory=list)
    encode_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    step_rows: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, bundle: Bundle, settings: EngineSettings, metrics: Metrics) -> None:
        self.bundle = bundle
        self.settings = settings
        self.metrics = metrics
        self.label = bundle.name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{bundle.name}-{bundle.version}")
        self._batch = DecodeBatch(bundle.runtime, pad_id=bundle.pad, copy=bundle.copy)  # worker thread only
        self._waiting: deque[Pending] = deque()
        self._active: dict[int, Pending] = {}
        self._wake = asyncio.Event()
        self._interrupt = threading.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"engine-{self.bundle.name}")

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    async def decode(self, jobs: list[Job], deadline: float | None = None) -> list[Job]:
        """Decode ``jobs`` inside the shared batch; returns them finished (``job.search.results()``)."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        if len(self._waiting) + len(jobs) > self.settings.max_queue:
            self.metrics.rejected.labels(self.label, "queue_full").inc(len(jobs))
            raise ResourceExhausted(f"the queue is full ({self.settings.max_queue} sources waiting); retry later")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        pending = [Pending(j, loop.create_future(), now, deadline) for j in jobs]
        for p in pending:
            p.job.tag = p
        self._waiting.extend(pending)
        self.metrics.queue_length.labels(self.label).set(len(self._waiting))
        self._wake.set()
        self._interrupt.set()
        try:
            await asyncio.gather(*(p.future for p in pending))
        except asyncio.CancelledError:
            for p in pending:
                p.cancelled = True
            self._interrupt.set()
            self._wake.set()
            raise
        except BaseException:
            for p in pending:
                p.cancelled = True
            raise
        return jobs

    async def close(self) -> None:
        """Finish what is queued and running, then stop the task and the worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ the task
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting and not self._active:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            self._expire_waiting(now)
            admit_count, wait_s = choose_admissions(
                [p.waiting() for p in self._waiting], self._batch_rows(), len(self._active), now, self.settings
            )
            if admit_count == 0 and not self._active:
                if wait_s > 0:  # request mode: collecting a batch
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait_s)
                continue
            admit = [self._waiting.popleft() for _ in range(admit_count)]
            for p in admit:
                self._active[id(p.job)] = p
                self.metrics.queue_wait_seconds.labels(self.label).observe(now - p.enqueued)
            drops = [p for p in self._active.values() if expired(p.waiting(), now) and p not in admit]
            for p in drops:
                del self._active[id(p.job)]
            self.metrics.queue_length.labels(self.label).set(len(self._waiting))
            self.metrics.active_sources.labels(self.label).set(len(self._active))
            self._interrupt.clear()
            deadlines = [p.deadline for p in self._active.values() if p.deadline is not None]
            next_deadline = min(deadlines) if deadlines else None
            try:
                result = await loop.run_in_executor(
                    self._executor, self._work, [p.job for p in admit], [p.job for p in drops], next_deadline
                )
            except Exception:
                log.exception("model %s version %d: decode step failed", self.bundle.name, self.bundle.version)
                self._fail_all()
                continue
            self._record(result)
            for p in drops:
                self._reject(p, now)
            for job in result.finished:
                p = self._active.pop(id(job))
                if not p.future.done():
                    p.future.set_result(job)

    def _batch_rows(self) -> int:
        return sum(p.job.k for p in self._active.values())

    def _expire_waiting(self, now: float) -> None:
        if not any(expired(p.waiting(), now, self.settings.max_queue_wait_ms) for p in self._waiting):
            return
        keep: deque[Pending] = deque()
        for p in self._waiting:
            if expired(p.waiting(), now, self.settings.max_queue_wait_ms):
                self._reject(p, now)
            else:
                keep.append(p)
        self._waiting = keep

    def _reject(self, p: Pending, now: float) -> None:
        if p.cancelled or p.future.done():
            self.metrics.rejected.labels(self.label, "cancelled").inc()
            return
        if p.deadline is not None and now >= p.deadline:
            self.metrics.rejected.labels(self.label, "deadline").inc()
            p.future.set_exception(DeadlineExceeded("the deadline passed before decoding finished"))
        else:
            self.metrics.rejected.labels(self.label, "queue_wait").inc()
            p.future.set_exception(
                ResourceExhausted(
                    f"waited more than {self.settings.max_queue_wait_ms} ms in the queue; the server is overloaded"
                )
            )

    def _fail_all(self) -> None:
        for p in list(self._active.values()):
            if not p.future.done():
                p.future.set_exception(RuntimeError("decode step failed"))
        self._active.clear()
        self._batch = DecodeBatch(self.bundle.runtime, pad_id=self.bundle.pad, copy=self.bundle.copy)

    def _record(self, result: WorkResult) -> None:
        m, label = self.metrics, self.label
        if result.encode_seconds:
            m.encoder_seconds.labels(label).observe(result.encode_seconds)
        for seconds, rows in zip(result.step_seconds, result.step_rows, strict=True):
            m.step_seconds.labels(label).observe(seconds)
            m.batch_rows.labels(label).observe(rows)
        m.active_sources.labels(label).set(len(self._active) - len(result.finished))

    # ------------------------------------------------------------------ the worker thread
    def _work(self, admit: list[Job], drops: list[Job], next_deadline: float | None) -> WorkResult:
        result = WorkResult()
        batch = self._batch
        if drops:
            batch.remove(drops)
        if admit:
            t0 = time.perf_counter()
            batch.add(admit)
            result.encode_seconds = time.perf_counter() - t0
        for _ in range(MAX_STEPS_PER_HOP):
            if not batch.jobs:
                break
            rows = batch.rows
            t0 = time.perf_counter()
            finished = batch.step()
            result.step_seconds.append(time.perf_counter() - t0)
            result.step_rows.append(rows)
            result.finished.extend(finished)
            if finished or self._interrupt.is_set():
                break
            if next_deadline is not None and time.monotonic() >= next_deadline:
                break
        return result
