"""Who joins the batch at the next step: pure functions over plain values (no asyncio, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BATCHING_MODES = ("step", "request")


@dataclass(frozen=True)
class EngineSettings:
    batching: str = "step"  # "step": join/leave at every decoder step; "request": whole batches
    max_rows: int = 1024  # hypothesis rows (sum of beam sizes) per decoder step
    max_queue: int = 4096  # sources waiting to join
    max_queue_wait_ms: int = 30_000  # a source waiting longer is refused (RESOURCE_EXHAUSTED)
    max_batch: int = 64  # request mode: sources per batch
    max_wait_ms: float = 5.0  # request mode: how long to collect a batch
    workers: int = 1  # engines per model version, each with its own onnxruntime sessions and thread
    join_wait_ms: float = 0.0  # step mode: while a batch runs, let newcomers gather this long (or max_batch of them)
    encoder_thread: bool = True  # step mode: encode newcomers on a second thread while the decoder steps go on

    def validate(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        for name in ("max_rows", "max_queue", "max_queue_wait_ms", "max_batch", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_wait_ms < 0 or self.join_wait_ms < 0:
            raise ValueError("max_wait_ms and join_wait_ms must be >= 0")


@dataclass(frozen=True)
class Waiting:
    rows: int  # beam size of the source
    enqueued: float  # monotonic seconds
    deadline: float | None
    cancelled: bool = False


def expired(w: Waiting, now: float, max_queue_wait_ms: int | None = None) -> bool:
    """Cancelled, past its deadline, or (still queued) waiting longer than allowed."""
    if w.cancelled or (w.deadline is not None and now >= w.deadline):
        return True
    return max_queue_wait_ms is not None and (now - w.enqueued) * 1000.0 > max_queue_wait_ms


def choose_admissions(
    waiting: Sequence[Waiting], active_rows: int, active_sources: int, now: float, settings: EngineSettings
) -> tuple[int, float]:
    """How many of the first waiting sources (FIFO) join now, and how long to wait if none can.

    Step mode: as many as fit in ``max_rows`` next to the running batch (with ``join_wait_ms`` > 0, newcomers
    to a running batch first gather until ``max_batch`` wait or the oldest waited that long, so that they are
    encoded together). Request mode: only into an empty batch, once ``max_batch`` sources wait or the oldest
    has waited ``max_wait_ms``.
    """
    if not waiting:
        return 0, 0.0
    if settings.batching == "request":
        if active_sources:
            return 0, 0.0
        window = settings.max_wait_ms / 1000.0 - (now - waiting[0].enqueued)
        if len(waiting) < settings.max_batch and window > 0:
            return 0, window
        limit = settings.max_batch
    else:
        if active_sources and settings.join_wait_ms > 0 and len(waiting) < settings.max_batch:
            window = settings.join_wait_ms / 1000.0 - (now - waiting[0].enqueued)
            if window > 0:  # encode newcomers together instead of one by one
                return 0, window
        limit = len(waiting)
    count = 0
    rows = active_rows
    for w in waiting[:limit]:
        if rows + w.rows > settings.max_rows:
            break
        rows += w.rows
        count += 1
    return count, 0.0
