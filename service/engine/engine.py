"""The batching engine of one model version.

One asyncio task owns the waiting queue and the set of active sources; one worker thread owns
the onnxruntime sessions and the :class:`DecodeBatch`. The two meet through an inbox:

- the task decides who joins (pure :func:`choose_admissions`) and who is dropped (cancelled, past
  the deadline) and posts ``add`` / ``drop`` messages;
- the worker runs decoder steps back to back; before every step it takes what the inbox holds, so
  a new source is encoded (together with the others that arrived, grouped by length) and joins the
  running batch at the next step; a source that finishes leaves the batch at once and its result is
  handed to the event loop without the worker waiting for it.
- with ``encoder_thread`` (step mode, the default), sources that join a *running* batch are encoded
  on a second thread instead, all that wait in one call, while the worker's decoder steps go on; the
  worker appends the encoded rows at its next step. A source for an idle batch is encoded by the worker
  itself (one thread hand-off less). onnxruntime sessions may be run from several threads at once.
  A cancelled or expired source is flagged ``dropped``, so neither thread lets it join.

Two batching modes: ``step`` (above) and ``request``, the classic baseline: collect up to
``max_batch`` sources or ``max_wait_ms``, decode that batch to the end (finished sources stop costing
compute) and answer all of it when its last source ends, then admit the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import Histogram

from service.engine.batch import DecodeBatch, Encoded, Job, encode_jobs
from service.engine.scheduler import EngineSettings, Waiting, choose_admissions, expired
from service.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from service.metrics import Metrics
from service.runtime.bundle import Bundle
from service.runtime.ort import Runtime

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    job: Job
    future: asyncio.Future[Job]
    enqueued: float
    deadline: float | None
    cancelled: bool = False

    def waiting(self) -> Waiting:
        return Waiting(rows=self.job.k, enqueued=self.enqueued, deadline=self.deadline, cancelled=self.cancelled)


class StepFailed(RuntimeError):
    """The worker's decode step raised; every active source is failed."""


class Engine:
    def __init__(
        self, bundle: Bundle, settings: EngineSettings, metrics: Metrics, runtime: Runtime | None = None, index: int = 0
    ) -> None:
        self.bundle = bundle
        self.runtime = runtime or bundle.runtime  # each worker owns its sessions
        self.settings = settings
        self.metrics = metrics
        self.label = bundle.name
        self._queue_length = metrics.queue_length.labels(self.label)
        self._active_sources = metrics.active_sources.labels(self.label)
        self._queue_wait = metrics.queue_wait_seconds.labels(self.label)
        # asyncio side (event-loop thread only)
        self._waiting: deque[Pending] = deque()
        self._active: dict[int, Pending] = {}
        self._active_rows = 0
        self._expiry_at = math.inf  # earliest deadline / queue-wait limit among the waiting (0: scan now)
        self._sleep_until = math.inf  # when the task wakes by itself next
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # the inbox between the two (deque appends and pops are thread-safe)
        self._inbox: deque[tuple[str, list[Job], Encoded | None]] = deque()
        self._has_work = threading.Event()
        self._thread = threading.Thread(
            target=self._worker, name=f"ort-{bundle.name}-{bundle.version}-{index}", daemon=True
        )
        # step mode with encoder_thread: sources that join a running batch are encoded on this thread, so the
        # decoder steps go on meanwhile (onnxruntime sessions are safe to run from several threads)
        self._enc_inbox: deque[list[Job] | None] = deque()
        self._enc_has_work = threading.Event()
        self._enc_thread = (
            threading.Thread(
                target=self._encoder_worker, name=f"enc-{bundle.name}-{bundle.version}-{index}", daemon=True
            )
            if settings.batching == "step" and settings.encoder_thread
            else None
        )
        self.encoded_aside = 0  # sources the encoder thread encoded (tests and debugging)

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        if self._enc_thread is not None:
            self._enc_thread.start()
        self._task = self._loop.create_task(self._run(), name=f"engine-{self.bundle.name}-{self.bundle.version}")

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
        self._waiting.extend(pending)
        self._expiry_at = min([self._expiry_at, *(self._expiry(p) for p in pending)])
        self._admit(now)  # straight to the worker when they can join now; the task handles the rest
        self._queue_length.set(len(self._waiting))
        self._active_sources.set(len(self._active))
        if self._waiting or (deadline is not None and deadline < self._sleep_until):
            self._wake.set()  # (not waking the task keeps the event loop free while the worker starts)
        try:
            if len(pending) == 1:  # one source (the common case): one loop iteration less than gather
                await pending[0].future
            else:
                await asyncio.gather(*(p.future for p in pending))
        except BaseException:
            for p in pending:
                p.cancelled = True
            self._expiry_at = 0.0  # cancelled sources still queued are dropped at the next wake
            self._wake.set()
            raise
        return jobs

    async def close(self) -> None:
        """Finish what is queued and running, then stop the task and the worker."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._post("stop", [])
        await asyncio.to_thread(self._thread.join)
        if self._enc_thread is not None:
            self._enc_inbox.append(None)
            self._enc_has_work.set()
            await asyncio.to_thread(self._enc_thread.join)

    # ------------------------------------------------------------------ the asyncio task
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            self._expire_waiting(now)
            self._drop_active(now)
            window = self._admit(now)
            self._queue_length.set(len(self._waiting))
            self._active_sources.set(len(self._active))
            if self._closing and not self._waiting and not self._active:
                return
            timeout = self._next_timeout(now, window)
            self._sleep_until = math.inf if timeout is None else now + timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _admit(self, now: float) -> float:
        """Post the waiting sources that can join now to the worker; returns how long to wait if none can."""
        if not self._waiting:
            return 0.0
        head = itertools.islice(self._waiting, max(self.settings.max_batch, self.settings.max_rows))
        count, window = choose_admissions(  # only the head of the queue can join now
            [p.waiting() for p in head], self._active_rows, len(self._active), now, self.settings
        )
        if count:
            running = bool(self._active)
            admit = [self._waiting.popleft() for _ in range(count)]
            for p in admit:
                self._active[id(p.job)] = p
                self._active_rows += p.job.k
                self._queue_wait.observe(now - p.enqueued)
            jobs = [p.job for p in admit]
            if running and self._enc_thread is not None:  # encode beside the running batch
                self._enc_inbox.append(jobs)
                self._enc_has_work.set()
            else:  # an idle worker encodes them itself: one thread hand-off less
                self._post("add", jobs)
        return window

    def _expiry(self, p: Pending) -> float:
        limit = p.enqueued + self.settings.max_queue_wait_ms / 1000.0
        return limit if p.deadline is None else min(limit, p.deadline)

    def _next_timeout(self, now: float, window: float) -> float | None:
        """Sleep until woken, the request-mode window closes, or the earliest deadline / queue limit passes."""
        times = [window] if window > 0 else []
        if self._expiry_at < math.inf:
            times.append(self._expiry_at - now)
        times.extend(p.deadline - now for p in self._active.values() if p.deadline is not None)
        return max(min(times), 0.0) + 0.001 if times else None

    def _post(self, op: str, jobs: list[Job], encoded: Encoded | None = None) -> None:
        self._inbox.append((op, jobs, encoded))
        self._has_work.set()

    def _expire_waiting(self, now: float) -> None:
        """Refuse waiting sources that are cancelled or past a limit; scans the queue only when one can be."""
        if now < self._expiry_at:
            return
        limit = self.settings.max_queue_wait_ms
        keep: deque[Pending] = deque()
        for p in self._waiting:
            if expired(p.waiting(), now, limit):
                self._reject(p, now)
            else:
                keep.append(p)
        self._waiting = keep
        self._expiry_at = min((self._expiry(p) for p in keep), default=math.inf)

    def _drop_active(self, now: float) -> None:
        drops = [p for p in self._active.values() if expired(p.waiting(), now)]
        if not drops:
            return
        for p in drops:
            p.job.dropped = True  # the threads skip it wherever it is
            del self._active[id(p.job)]
            self._active_rows -= p.job.k
            self._reject(p, now)
        self._post("drop", [])  # wakes the worker; it removes the flagged sources' rows

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

    def _finished(self, jobs: list[Job], error: bool) -> None:
        """Called on the event loop by the worker: answer finished sources at once, admit the waiting ones."""
        for job in jobs:
            p = self._active.pop(id(job), None)
            if p is None:  # dropped meanwhile
                continue
            self._active_rows -= job.k
            if p.future.done():
                continue
            if error:
                p.future.set_exception(StepFailed("decode step failed"))
            else:
                p.future.set_result(job)
        self._active_sources.set(len(self._active))
        if self._waiting or self._closing:  # someone can join now, or the task may be done
            self._wake.set()

    @property
    def load(self) -> int:
        """Rows running and waiting: what a pool balances on."""
        return self._active_rows + sum(p.job.k for p in self._waiting)

    # ------------------------------------------------------------------ the worker thread
    def _new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.runtime, pad_id=self.bundle.pad, copy=self.bundle.copy)

    def _worker(self) -> None:
        batch = self._new_batch()
        assert self._loop is not None
        loop = self._loop
        m, label = self.metrics, self.label
        encoder_seconds, step_seconds = m.encoder_seconds.labels(label), m.step_seconds.labels(label)
        batch_rows = m.batch_rows.labels(label)
        held: list[Job] = []  # request batching: finished sources of the running batch
        while True:
            if not batch.jobs and not self._inbox:
                self._has_work.wait()
                self._has_work.clear()
            joining: list[Job] = []
            encoded: list[Encoded] = []
            try:
                while self._inbox:
                    op, jobs, enc = self._inbox.popleft()
                    if op == "stop":
                        return
                    if op == "add":
                        joining.extend(jobs)
                    elif op == "join":  # encoded by the encoder thread
                        assert enc is not None
                        encoded.append(enc)
                    else:  # drop: the rows of sources flagged ``dropped`` leave; joining ones are skipped below
                        batch.remove([j for j in batch.jobs if j.dropped])
                joining = [j for j in joining if not j.dropped]
                if joining:  # a failed encoder call fails only these sources (in _encode), not the batch
                    own = self._encode(joining, encoder_seconds)
                    if own is not None:
                        encoded.append(own)
                while encoded:
                    batch.append(encoded.pop(0))
                if not batch.jobs:
                    if held:  # request batching: the rest of the batch was dropped; answer what finished
                        loop.call_soon_threadsafe(self._finished, held, False)
                        held = []
                    continue
                rows = batch.rows
                t0 = time.perf_counter()
                finished = batch.step()
                step_seconds.observe(time.perf_counter() - t0)
                batch_rows.observe(rows)
            except Exception:
                log.exception("model %s version %d: decode step failed", self.bundle.name, self.bundle.version)
                failed = list(batch.jobs) + held + [j for enc in encoded for j in enc.jobs]
                held = []
                batch = self._new_batch()
                loop.call_soon_threadsafe(self._finished, failed, True)
                continue
            if not finished:
                continue
            if self.settings.batching == "request":  # a batch is answered as a whole, when its last source ends
                held.extend(finished)
                if batch.jobs:
                    continue
                finished, held = held, []
            loop.call_soon_threadsafe(self._finished, finished, False)

    def _encoder_worker(self) -> None:
        """Step mode with ``encoder_thread``: encode sources that join a running batch, hand them to the worker."""
        encoder_seconds = self.metrics.encoder_seconds.labels(self.label)
        while True:
            if not self._enc_inbox:
                self._enc_has_work.wait()
                self._enc_has_work.clear()
            jobs: list[Job] = []
            stop = False
            while self._enc_inbox:  # everything that is waiting goes into one (grouped) encoder call
                item = self._enc_inbox.popleft()
                if item is None:
                    stop = True
                else:
                    jobs.extend(item)
            jobs = [j for j in jobs if not j.dropped]
            if jobs:
                enc = self._encode(jobs, encoder_seconds)
                if enc is not None:
                    self.encoded_aside += len(jobs)
                    self._post("join", jobs, enc)
            if stop:
                return

    def _encode(self, jobs: list[Job], seconds: Histogram) -> Encoded | None:
        """Encode on the calling thread; if the encoder raises, fail these sources (only) and return None."""
        t0 = time.perf_counter()
        try:
            enc = encode_jobs(self.runtime, jobs, self.bundle.pad, self.bundle.copy)
        except Exception:
            log.exception("model %s version %d: encoder failed", self.bundle.name, self.bundle.version)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._finished, jobs, True)
            return None
        seconds.observe(time.perf_counter() - t0)
        return enc


class EnginePool:
    """``workers`` engines of one model version, each with its own sessions and decode batch.

    A request goes whole to the engine with the least rows running and waiting (PERF_NOTES: several
    one-thread workers beat one session with several threads on few cores).
    """

    def __init__(
        self, bundle: Bundle, settings: EngineSettings, metrics: Metrics, threads: int = 1, device: str = "cpu"
    ) -> None:
        self.bundle = bundle
        self.settings = settings
        runtimes = [bundle.runtime] + [
            Runtime(bundle.directory, bundle.manifest, threads=threads, device=device)
            for _ in range(settings.workers - 1)
        ]
        self.engines = [Engine(bundle, settings, metrics, rt, i) for i, rt in enumerate(runtimes)]

    def start(self) -> None:
        for e in self.engines:
            e.start()

    @property
    def queued(self) -> int:
        return sum(e.queued for e in self.engines)

    @property
    def active(self) -> int:
        return sum(e.active for e in self.engines)

    async def decode(self, jobs: list[Job], deadline: float | None = None) -> list[Job]:
        engine = self.engines[0] if len(self.engines) == 1 else min(self.engines, key=lambda e: e.load)
        return await engine.decode(jobs, deadline)

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.engines))
