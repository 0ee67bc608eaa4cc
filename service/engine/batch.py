"""The running decode batch: rows of every active search and their recurrent state.

Rows of one search are contiguous (``K`` of them). A search joins at the next step with its
encoder output repeated K times, and leaves the moment it is done; each step gathers every
recurrent state with one index (``select``), which both follows each hypothesis and drops the
rows of searches that left. Pure numpy plus a runtime object with ``encode`` / ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from service.engine.beam import NEG_INF, BeamSearch, advance_plain
from service.text import NEVER_GENERATED

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class StepResult(Protocol):
    log_probs: FloatArray  # [N, V']
    states: list[FloatArray]  # each [L, N, H]
    feed: FloatArray  # [N, H]
    attention: FloatArray  # [N, S]


class DecoderRuntime(Protocol):
    """What the batch needs from a runtime (the onnxruntime one, or a fake in tests)."""

    def encode(self, src: IntArray, src_len: IntArray) -> tuple[FloatArray, list[FloatArray]]: ...

    def step(
        self,
        tokens: IntArray,
        states: list[FloatArray],
        feed: FloatArray,
        memory: FloatArray,
        src_len: IntArray,
        step: IntArray,
        src_ext: IntArray | None = None,
    ) -> StepResult: ...

    def initial_feed(self, rows: int) -> FloatArray: ...


@dataclass(eq=False)
class Job:
    """One source being decoded; ``tag`` is the engine's handle (a future, a request id...)."""

    search: BeamSearch
    src_ids: list[int]
    src_ext: list[int] | None = None
    tag: Any = None
    joined_at_step: int = field(default=-1)
    dropped: bool = False  # set by the engine when the source is cancelled or expires; its rows never join

    @property
    def k(self) -> int:
        return self.search.k


def pad_ids(rows: Sequence[Sequence[int]], pad: int) -> tuple[IntArray, IntArray]:
    """-> ids [B, S] padded with ``pad``, lengths [B]."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    out = np.full((len(rows), int(lengths.max())), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


# The fixed cost of one encoder call, in source-token slots (one token position of one source): splitting a
# group pays off when it saves more padding than this. Chosen by measurement with the shipped G2P bundle on the
# 2-core dev machine (BENCHMARKS.md, "Encoder calls"): 64 CMUdict words per call took 50.7 ms padded to the
# longest and 32.1 ms in groups at 20 slots; with 2-16 words grouping changed nothing beyond noise.
ENCODER_CALL_SLOTS = 20
# Plain searches advance together (advance_plain) from this many per group. Measured on the dev machine with the
# shipped G2P bundle (Python only, onnxruntime outputs cached), µs per step, vectorised vs one by one: 1 search
# 214 vs 107, 4: 287 vs 211, 6: 393 vs 371, 8: 430 vs 547, 16: 539 vs 782, 64: 2,103 vs 3,512.
VECTORISE_FROM = 8
MAX_GROUPED = 65_536  # above this many sources, keep one call (the DP is quadratic in distinct lengths)


def encoder_groups(lengths: Sequence[int], call_slots: int = ENCODER_CALL_SLOTS) -> list[list[int]]:
    """Split sources into encoder calls: sorted by length, cut where padding would cost more than a call.

    Minimises ``sum(call_slots + size * longest)`` over contiguous groups of the length-sorted sources
    (exact dynamic programme over the distinct lengths: cutting between equal lengths never pays).
    Returns indices into ``lengths``; one group when nothing is saved.
    """
    n = len(lengths)
    if n <= 1 or n > MAX_GROUPED:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lengths[i])
    ends: list[int] = []  # end (exclusive, in sorted order) of each run of equal lengths
    for pos in range(1, n + 1):
        if pos == n or lengths[order[pos]] != lengths[order[pos - 1]]:
            ends.append(pos)
    if len(ends) == 1:
        return [order]
    starts = [0, *ends[:-1]]
    best = [0.0] + [math.inf] * len(ends)  # best[r]: cost of the sources in the first r runs
    cut = [0] * (len(ends) + 1)
    for r in range(1, len(ends) + 1):
        longest = lengths[order[ends[r - 1] - 1]]
        for q in range(r):
            cost = best[q] + call_slots + (ends[r - 1] - starts[q]) * longest
            if cost < best[r]:
                best[r], cut[r] = cost, q
    groups: list[list[int]] = []
    r = len(ends)
    while r > 0:
        groups.append(order[starts[cut[r]] : ends[r - 1]])
        r = cut[r]
    groups.reverse()
    return groups


def _pad_axis1(x: npt.NDArray[Any], width: int, value: float | int = 0) -> npt.NDArray[Any]:
    if x.shape[1] >= width:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, width - x.shape[1])
    return np.pad(x, pad, constant_values=value)


@dataclass(eq=False)
class Encoded:
    """Sources encoded and expanded to their K rows each, ready to join a batch (made on any thread)."""

    jobs: list[Job]
    memory: FloatArray  # [R, S, M]
    states: list[FloatArray]  # each [L, R, H]
    src_len: IntArray  # [R]
    src_ext: IntArray | None  # [R, S] (copy models)
    feed: FloatArray  # [R, H]

    def without_dropped(self) -> Encoded:
        rows = kept_rows(self.jobs, lambda j: not j.dropped)
        return Encoded(
            [j for j in self.jobs if not j.dropped],
            self.memory[rows],
            [s[:, rows] for s in self.states],
            self.src_len[rows],
            None if self.src_ext is None else self.src_ext[rows],
            self.feed[rows],
        )


def kept_rows(jobs: Sequence[Job], keep: Callable[[Job], bool]) -> IntArray:
    """The row indices (K per job, jobs in order) of the jobs that ``keep`` accepts."""
    rows: list[int] = []
    offset = 0
    for j in jobs:
        if keep(j):
            rows.extend(range(offset, offset + j.k))
        offset += j.k
    return np.array(rows, dtype=np.int64)


def encode_jobs(runtime: DecoderRuntime, jobs: Sequence[Job], pad_id: int, copy: bool) -> Encoded:
    """Encode sources in length-sorted groups (:func:`encoder_groups`) and repeat each K times."""
    src, src_len = pad_ids([j.src_ids for j in jobs], pad_id)
    memory, states = _encode_grouped(runtime, src, src_len)  # [J, S, M], each [L, J, H]
    rep = np.repeat(np.arange(len(jobs)), [j.k for j in jobs])  # [R]
    ext = None
    if copy:
        ids, _ = pad_ids([j.src_ext or [] for j in jobs], pad_id)
        ext = _pad_axis1(ids, src.shape[1], pad_id)[rep]
    return Encoded(
        list(jobs), memory[rep], [s[:, rep] for s in states], src_len[rep], ext, runtime.initial_feed(len(rep))
    )


def _encode_grouped(runtime: DecoderRuntime, src: IntArray, src_len: IntArray) -> tuple[FloatArray, list[FloatArray]]:
    groups = encoder_groups(src_len.tolist())
    if len(groups) == 1:
        return runtime.encode(src, src_len)
    parts = []
    for idx in groups:
        index = np.array(idx, dtype=np.int64)
        lens = src_len[index]
        parts.append(runtime.encode(src[index, : int(lens.max())], lens))
    width = src.shape[1]
    order = np.argsort(np.concatenate([np.array(idx, dtype=np.int64) for idx in groups]), kind="stable")
    memory = np.concatenate([_pad_axis1(m, width) for m, _ in parts])[order]
    states = [np.concatenate([s[i] for _, s in parts], axis=1)[:, order] for i in range(len(parts[0][1]))]
    return memory, states


class RowMemory:
    """The encoder memory of every row, ``[N, S, M]``, kept in two reusable buffers.

    Rows join and leave at almost every step under load. Concatenating and fancy-indexing a fresh
    ``[N, S, M]`` array each time allocated tens of MB per step (page faults included) and took as
    long as half a decoder step at N = 640 (BENCHMARKS.md). Here joining writes into spare capacity,
    and leaving is one ``np.take`` into the other buffer; buffers grow by doubling and are reused.
    """

    def __init__(self) -> None:
        self._buffers = [np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32)]
        self.rows = 0
        self.width = 0
        self.dim = 0

    def view(self) -> FloatArray:
        """The current ``[N, S, M]`` memory (a contiguous view; valid until the next change)."""
        return self._buffers[0][: self.rows * self.width * self.dim].reshape(self.rows, self.width, self.dim)

    def _spare(self, which: int, size: int, keep: int = 0) -> FloatArray:
        """Buffer ``which`` with room for ``size`` floats; its first ``keep`` floats survive a regrowth."""
        buf = self._buffers[which]
        if buf.size < size:
            grown = np.empty(max(size, 2 * buf.size), dtype=np.float32)
            grown[:keep] = buf[:keep]
            self._buffers[which] = buf = grown
        return buf

    def append(self, new: FloatArray) -> None:
        """Add rows ``new`` [R, S', M] after the current ones (padding whichever is narrower with zeros)."""
        count, width, dim = new.shape
        if self.rows == 0:
            self.width, self.dim = width, dim
        elif width > self.width:
            self._relayout(width)
        w = self.width
        buf = self._spare(0, (self.rows + count) * w * dim, keep=self.rows * w * dim)
        dst = buf[self.rows * w * dim : (self.rows + count) * w * dim].reshape(count, w, dim)
        dst[:, :width] = new
        if width < w:
            dst[:, width:] = 0.0
        self.rows += count

    def _relayout(self, width: int) -> None:
        size = self.rows * width * self.dim
        out = self._spare(1, size)[:size].reshape(self.rows, width, self.dim)
        out[:, : self.width] = self.view()
        out[:, self.width :] = 0.0
        self._buffers.reverse()
        self.width = width

    def gather(self, index: IntArray, width: int) -> None:
        """Keep rows ``index`` (in that order), narrowed to ``width`` positions."""
        size = len(index) * width * self.dim
        out = self._spare(1, size)[:size].reshape(len(index), width, self.dim)
        np.take(self.view()[:, :width], index, axis=0, out=out, mode="clip")  # "clip": no temporary copy
        self._buffers.reverse()
        self.rows, self.width = len(index), width

    def clear(self) -> None:
        self.rows = 0


class DecodeBatch:
    def __init__(self, runtime: DecoderRuntime, pad_id: int = 0, copy: bool = False) -> None:
        self.runtime = runtime
        self.pad_id = pad_id
        self.copy = copy
        self.jobs: list[Job] = []
        self.states: list[FloatArray] = []
        self.feed: FloatArray | None = None
        self._memory = RowMemory()  # [N, S, M]
        self.src_len: IntArray | None = None  # [N]
        self.src_ext: IntArray | None = None  # [N, S] (copy models)
        self.steps = 0

    @property
    def rows(self) -> int:
        return sum(j.k for j in self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    # ------------------------------------------------------------------ join
    def add(self, jobs: Sequence[Job]) -> None:
        """Encode ``jobs`` (see :func:`encode_jobs`) and append their K rows each."""
        if jobs:
            self.append(encode_jobs(self.runtime, jobs, self.pad_id, self.copy))

    def append(self, enc: Encoded) -> None:
        """Add encoded sources to the batch; they take part from the next step. Dropped ones are skipped."""
        if any(j.dropped for j in enc.jobs):
            enc = enc.without_dropped()
        if not enc.jobs:
            return
        for j in enc.jobs:
            j.joined_at_step = self.steps
        self._memory.append(enc.memory)
        if not self.jobs:
            self.states, self.src_len, self.src_ext, self.feed = enc.states, enc.src_len, enc.src_ext, enc.feed
        else:
            assert self.feed is not None and self.src_len is not None
            width = self._memory.width
            self.states = [np.concatenate([a, b], axis=1) for a, b in zip(self.states, enc.states, strict=True)]
            self.src_len = np.concatenate([self.src_len, enc.src_len])
            self.feed = np.concatenate([self.feed, enc.feed])
            if self.src_ext is not None:
                assert enc.src_ext is not None
                self.src_ext = np.concatenate(
                    [_pad_axis1(self.src_ext, width, self.pad_id), _pad_axis1(enc.src_ext, width, self.pad_id)]
                )
        self.jobs.extend(enc.jobs)

    # ------------------------------------------------------------------ leave
    def remove(self, jobs: Sequence[Job]) -> None:
        """Drop the rows of ``jobs`` (cancelled or expired) before the next step."""
        if not jobs:  # (e.g. the dropped source had not joined yet): nothing to gather
            return
        gone = set(map(id, jobs))
        index = kept_rows(self.jobs, lambda j: id(j) not in gone)
        self.jobs = [j for j in self.jobs if id(j) not in gone]
        self._gather(index, reorder_memory=True)

    @property
    def memory(self) -> FloatArray:
        """Encoder memory of every row, [N, S, M]."""
        return self._memory.view()

    def _gather(self, index: IntArray, reorder_memory: bool) -> None:
        if not self.jobs:
            self.feed = self.src_len = self.src_ext = None
            self.states = []
            self._memory.clear()
            return
        assert self.feed is not None and self.src_len is not None
        self.states = [s[:, index] for s in self.states]  # the batch axis of [L, N, H] is 1
        self.feed = self.feed[index]
        if reorder_memory:
            self.src_len = self.src_len[index]
            width = int(self.src_len.max())
            self._memory.gather(index, width)
            if self.src_ext is not None:
                self.src_ext = self.src_ext[index, :width]

    # ------------------------------------------------------------------ step
    def step(self) -> list[Job]:
        """One decoder step for every row; returns the jobs that finished (already removed)."""
        if not self.jobs:
            return []
        assert self.feed is not None and self.src_len is not None
        tokens = np.concatenate([j.search.tokens for j in self.jobs])  # [N]
        steps = np.repeat(np.array([j.search.t for j in self.jobs], dtype=np.int64), [j.k for j in self.jobs])
        out = self.runtime.step(tokens, self.states, self.feed, self.memory, self.src_len, steps, self.src_ext)
        self.steps += 1
        log_probs = out.log_probs if out.log_probs.flags.writeable else out.log_probs.copy()
        log_probs[:, NEVER_GENERATED] = NEG_INF  # whatever weight the model (or sampling) gives them
        selects = self._advance(log_probs, out.attention)
        index: list[IntArray] = []
        finished: list[Job] = []
        offset = 0
        kept: list[Job] = []
        for j, select in zip(self.jobs, selects, strict=True):
            if j.search.done:
                finished.append(j)
            else:
                index.append(select + offset)
                kept.append(j)
            offset += j.k
        self.states, self.feed = out.states, out.feed
        membership_changed = len(kept) != len(self.jobs)
        self.jobs = kept
        gather = np.concatenate(index) if index else np.zeros(0, dtype=np.int64)
        if membership_changed:
            self._gather(gather, reorder_memory=True)
        else:  # memory, lengths and copy ids are the same for all rows of a search: no reorder needed
            self._gather(gather, reorder_memory=False)
        return finished

    def _advance(self, log_probs: FloatArray, attention: FloatArray) -> list[IntArray]:
        """Advance every search by one step; plain ones together (:func:`advance_plain`), the rest one by one."""
        jobs = self.jobs
        offsets = np.cumsum([0] + [j.k for j in jobs]).tolist()
        selects: list[IntArray] = [np.zeros(0, dtype=np.int64)] * len(jobs)
        groups, others = _plain_groups(jobs)
        for key in [key for key, members in groups.items() if len(members) < VECTORISE_FROM]:
            others.extend(groups.pop(key))  # too few to pay for the vectorised bookkeeping
        for i in others:
            rows = slice(offsets[i], offsets[i + 1])
            search = jobs[i].search
            selects[i] = search.advance(log_probs[rows], attention[rows] if search.options.needs_attention else None)
        for (k, _), members in groups.items():
            if len(members) == len(jobs):  # the usual case: the rows are already in order
                lp = log_probs
            else:
                lp = log_probs[np.concatenate([np.arange(offsets[i], offsets[i] + k) for i in members])]
            for i, select in zip(members, advance_plain([jobs[i].search for i in members], lp), strict=True):
                selects[i] = select
        return selects


def _plain_groups(jobs: Sequence[Job]) -> tuple[dict[tuple[int, int], list[int]], list[int]]:
    """Indices of the plain searches grouped by (K, end token), and of the others."""
    groups: dict[tuple[int, int], list[int]] = {}
    others: list[int] = []
    for i, j in enumerate(jobs):
        if j.search.plain:
            groups.setdefault((j.k, j.search.eos), []).append(i)
        else:
            others.append(i)
    return groups, others


def decode_all(
    runtime: DecoderRuntime, jobs: Sequence[Job], max_rows: int = 2048, copy: bool = False, pad_id: int = 0
) -> list[Job]:
    """Decode ``jobs`` to the end with step-level batching (jobs join as rows free up).

    The synchronous path used by export parity checks and offline evaluation; the server's
    engine runs the same :class:`DecodeBatch` one step at a time.
    """
    batch = DecodeBatch(runtime, pad_id=pad_id, copy=copy)
    waiting = list(jobs)
    waiting.reverse()
    done: list[Job] = []
    while waiting or batch.jobs:
        joining: list[Job] = []
        rows = batch.rows
        while waiting and rows + waiting[-1].k <= max_rows:
            rows += waiting[-1].k
            joining.append(waiting.pop())
        if not joining and not batch.jobs:
            raise ValueError(f"a job needs {waiting[-1].k} rows, more than max_rows={max_rows}")
        batch.add(joining)
        done.extend(batch.step())
    return done
