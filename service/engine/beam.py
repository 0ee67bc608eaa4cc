"""Beam search for one source, pure numpy: no onnxruntime, asyncio, logging or metrics here.

The engine owns K rows of the shared decode batch for every active search. Each step it
hands the search its rows' log-probabilities (and attention); the search returns which of
its rows each new hypothesis continues (``select``, local row indices) and the next tokens.
The engine applies ``select`` to every recurrent state so that state follows its hypothesis.

Semantics are exactly those of the torch reference (``training.decode``): the 2K best
candidates by accumulated log-probability (ties: lower flat index first); an end-of-sentence
candidate ranked within the first K is finished; the others refill the K live beams in order;
a search is done with K finished hypotheses, or at ``max_len`` where the live ones finish as
they are. Finished hypotheses are ranked by length-normalised score plus coverage penalty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

NEG_INF = float("-inf")
FULL_SORT_LIMIT = 1 << 16  # candidates per search above which a partial sort is used

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class OptionsError(ValueError):
    """Decoding options that cannot be honoured."""


@dataclass(frozen=True)
class SearchOptions:
    """Resolved per-source decoding options (lengths are absolute here)."""

    beam_size: int = 5
    n_best: int = 1
    max_len: int = 50
    min_len: int = 0
    length_penalty: str = "none"  # "none" | "gnmt" | "avg"
    alpha: float = 0.0
    coverage_beta: float = 0.0
    no_repeat_ngram: int = 0
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    keep_attention: bool = False

    def validate(self) -> None:
        if self.beam_size < 1:
            raise OptionsError("beam_size must be >= 1")
        if not 1 <= self.n_best <= self.beam_size:
            raise OptionsError(f"num_hypotheses must be between 1 and beam_size ({self.beam_size})")
        if self.max_len < 1:
            raise OptionsError("max_length must be >= 1")
        if self.min_len < 0 or self.min_len > self.max_len:
            raise OptionsError(f"min_length must be between 0 and max_length ({self.max_len})")
        if self.length_penalty not in ("none", "gnmt", "avg"):
            raise OptionsError("length_penalty must be none, gnmt or avg")
        if self.alpha < 0 or self.coverage_beta < 0:
            raise OptionsError("length_penalty_alpha and coverage_penalty_beta must be >= 0")
        if self.no_repeat_ngram < 0:
            raise OptionsError("no_repeat_ngram_size must be >= 0")
        if self.sampling:
            if self.beam_size != 1:
                raise OptionsError("sampling needs beam_size 1")
            if not self.temperature > 0:
                raise OptionsError("temperature must be > 0")
            if self.top_k < 0:
                raise OptionsError("top_k must be >= 0")

    @property
    def needs_attention(self) -> bool:
        return self.keep_attention or self.coverage_beta > 0


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # without <s> and </s>
    score: float  # ranking score
    log_prob: float
    attention: FloatArray | None = None  # [len(tokens), S] when kept


def normalise(log_prob: float, length: int, length_penalty: str, alpha: float) -> float:
    if length_penalty == "gnmt":
        return log_prob / float(((5.0 + length) / 6.0) ** alpha)
    if length_penalty == "avg":
        return log_prob / max(length, 1)
    return log_prob


def coverage_penalty(coverage: FloatArray, beta: float) -> float:
    """GNMT: beta * sum_i log(min(sum_t a_ti, 1)), floored so an unattended position costs a finite amount."""
    if beta == 0.0 or coverage.size == 0:
        return 0.0
    total: float = np.log(np.clip(coverage, 1e-6, 1.0)).sum().item()
    return beta * total


def top_candidates(cand: FloatArray, count: int) -> IntArray:
    """Indices of the ``count`` largest values, descending; ties by lower index (a stable sort)."""
    top: IntArray = top_candidates_rows(cand.reshape(1, -1), count)[0]
    return top


def top_candidates_rows(cand: FloatArray, count: int) -> IntArray:
    """:func:`top_candidates` for every row of ``cand`` [J, C] at once -> [J, count]."""
    if cand.shape[1] <= FULL_SORT_LIMIT or count >= cand.shape[1]:
        return np.argsort(-cand, axis=1, kind="stable")[:, :count].astype(np.int64)
    # Partial sort. Values tied with the count-th largest at the cut may be split arbitrarily by argpartition:
    # rows where that can happen are ranked again over every candidate at or above the cut, by value then
    # index, so the result always equals the stable full sort (and the torch reference's choice).
    part = np.argpartition(-cand, count - 1, axis=1)[:, :count]
    values = np.take_along_axis(cand, part, axis=1)
    top = np.take_along_axis(part, np.lexsort((part, -values), axis=-1), axis=1).astype(np.int64)
    threshold = values.min(axis=1)
    for row in np.flatnonzero(np.count_nonzero(cand >= threshold[:, None], axis=1) > count):
        above = np.flatnonzero(cand[row] >= threshold[row])
        top[row] = above[np.argsort(-cand[row, above], kind="stable")[:count]]
    return top


class BeamSearch:
    """The search state of one source: K rows in the shared batch."""

    def __init__(
        self, options: SearchOptions, src_len: int, bos: int, eos: int, pad: int, vocab_limit: int | None = None
    ) -> None:
        options.validate()
        self.options = options
        self.k = options.beam_size
        self.src_len = src_len
        self.eos = eos
        self.pad = pad
        self.vocab_limit = vocab_limit  # copy models: only ids < V + (source OOVs) exist for this source
        self.scores: FloatArray = np.full(self.k, NEG_INF, dtype=np.float32)
        self.scores[0] = 0.0
        self.seqs: list[list[int]] = [[] for _ in range(self.k)]
        self.tokens: IntArray = np.full(self.k, bos, dtype=np.int64)
        self.coverage: FloatArray | None = (
            np.zeros((self.k, src_len), dtype=np.float32) if options.coverage_beta > 0 else None
        )
        self.history: list[list[FloatArray]] | None = [[] for _ in range(self.k)] if options.keep_attention else None
        self.finished: list[Hypothesis] = []
        self.t = 0
        self.done = False
        self._rng = np.random.default_rng(options.seed or None) if options.sampling else None
        # plain searches (no sampling, n-gram blocking, attention or vocabulary limit) can advance together
        self.plain = not (
            options.sampling or options.no_repeat_ngram or options.needs_attention or vocab_limit is not None
        )

    # ------------------------------------------------------------------ one step
    def advance(self, log_probs: FloatArray, attention: FloatArray | None = None) -> IntArray:
        """log_probs [K, V'] and attention [K, S'] for this search's rows -> select [K] (local rows).

        After the call, ``tokens`` holds the next input token of each row and ``done`` tells
        whether the search has finished (its rows can leave the batch).
        """
        if self.done:
            raise RuntimeError("advance() on a finished search")
        opts = self.options
        if self.vocab_limit is not None:
            log_probs = log_probs[:, : self.vocab_limit]
        attn = None if attention is None else attention[:, : self.src_len]
        log_probs = self._constrain(log_probs)
        if opts.sampling:
            picks = self._sample(log_probs)
        else:
            picks = self._search(log_probs)
        select = self._apply(picks, attn)
        self.t += 1
        if not self.done and self.t >= opts.max_len:
            self._finish_live()
        return select

    def _constrain(self, log_probs: FloatArray) -> FloatArray:
        opts = self.options
        blocked = self.t < opts.min_len or opts.no_repeat_ngram > 0
        if not blocked:
            return log_probs
        log_probs = np.array(log_probs, dtype=np.float32, copy=True)
        if self.t < opts.min_len:
            log_probs[:, self.eos] = NEG_INF
        n = opts.no_repeat_ngram
        if n > 0:
            for row, seq in enumerate(self.seqs):
                if len(seq) < n - 1 or self.scores[row] == NEG_INF:
                    continue
                prefix = tuple(seq[len(seq) - (n - 1) :]) if n > 1 else ()
                banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]
                if banned:
                    log_probs[row, banned] = NEG_INF
        return log_probs

    def _search(self, log_probs: FloatArray) -> list[tuple[int, int, float]]:
        """-> the chosen candidates (row, token, accumulated log-prob), EOS ones included, in rank order."""
        k = self.k
        vocab = log_probs.shape[1]
        cand = (self.scores[:, None] + log_probs).reshape(-1)  # [K * V'] float32
        top = top_candidates(cand, min(2 * k, cand.size))
        picks = []
        live = 0
        for rank, (flat, value) in enumerate(zip(top.tolist(), cand[top].tolist(), strict=True)):
            if value == NEG_INF:
                break
            row, token = divmod(flat, vocab)
            if token == self.eos:
                if rank < k:
                    picks.append((row, token, value))
            elif live < k:
                picks.append((row, token, value))
                live += 1
        return picks

    def _sample(self, log_probs: FloatArray) -> list[tuple[int, int, float]]:
        assert self._rng is not None
        opts = self.options
        row_lp = log_probs[0].astype(np.float64)
        logits = row_lp / opts.temperature
        if opts.top_k:
            keep = np.argsort(-logits, kind="stable")[: opts.top_k]
            masked = np.full_like(logits, -np.inf)
            masked[keep] = logits[keep]
            logits = masked
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        token = int(self._rng.choice(len(probs), p=probs))
        return [(0, token, float(np.float32(self.scores[0]) + np.float32(row_lp[token])))]

    def _apply(self, picks: list[tuple[int, int, float]], attn: FloatArray | None) -> IntArray:
        opts = self.options
        live_rows: list[int] = []
        live_tokens: list[int] = []
        live_scores: list[float] = []
        for row, token, value in picks:
            if token == self.eos:
                length = self.t + 1
                cov = 0.0
                if self.coverage is not None and attn is not None:
                    cov = coverage_penalty(self.coverage[row] + attn[row], opts.coverage_beta)
                history = None
                if self.history is not None:
                    history = _stack(self.history[row], self.src_len)
                score = normalise(value, length, opts.length_penalty, opts.alpha) + cov
                self.finished.append(Hypothesis(tuple(self.seqs[row]), score, value, history))
            else:
                live_rows.append(row)
                live_tokens.append(token)
                live_scores.append(value)
        if len(self.finished) >= self.k or not live_rows:
            self.done = True
            return np.zeros(self.k, dtype=np.int64)
        pad = self.k - len(live_rows)
        select = np.array(live_rows + [0] * pad, dtype=np.int64)
        self.seqs = [self.seqs[r] + [tok] for r, tok in zip(live_rows, live_tokens, strict=True)] + [[]] * pad
        self.scores = np.array(live_scores + [NEG_INF] * pad, dtype=np.float32)
        self.tokens = np.array(live_tokens + [self.pad] * pad, dtype=np.int64)
        if self.coverage is not None and attn is not None:
            self.coverage = self.coverage[select] + attn[select]
        if self.history is not None and attn is not None:
            self.history = [self.history[r] + [attn[r]] for r in live_rows] + [[] for _ in range(pad)]
        return select

    def _finish_live(self) -> None:
        opts = self.options
        for row, (seq, value) in enumerate(zip(self.seqs, self.scores.tolist(), strict=True)):
            if value == NEG_INF:
                continue
            cov = coverage_penalty(self.coverage[row], opts.coverage_beta) if self.coverage is not None else 0.0
            history = _stack(self.history[row], self.src_len) if self.history is not None else None
            score = normalise(value, len(seq), opts.length_penalty, opts.alpha) + cov
            self.finished.append(Hypothesis(tuple(seq), score, value, history))
        self.done = True

    # ------------------------------------------------------------------ results
    def results(self) -> list[Hypothesis]:
        """The n-best finished hypotheses, best first (ties keep finishing order)."""
        return sorted(self.finished, key=lambda h: -h.score)[: self.options.n_best]


def advance_plain(searches: Sequence[BeamSearch], log_probs: FloatArray) -> list[IntArray]:
    """``advance`` for J plain searches with the same K and end token, vectorised across them.

    ``log_probs`` [J*K, V] holds the searches' rows in order. Exactly the semantics of
    :meth:`BeamSearch.advance` (tested against it): only the bookkeeping loop is shared.
    """
    first = searches[0]
    k, eos = first.k, first.eos
    count = len(searches)
    vocab = log_probs.shape[1]
    lp = log_probs.reshape(count, k, vocab)
    blocked = [i for i, s in enumerate(searches) if s.t < s.options.min_len]
    if blocked:
        lp = lp.copy()
        lp[blocked, :, eos] = NEG_INF
    scores = np.stack([s.scores for s in searches])  # [J, K]
    cand = (scores[:, :, None] + lp).reshape(count, k * vocab)
    top = top_candidates_rows(cand, min(2 * k, k * vocab))  # [J, 2K]
    vals = np.take_along_axis(cand, top, axis=1)
    rows, tokens = np.divmod(top, vocab)
    finite = vals != NEG_INF
    is_eos = tokens == eos
    ended = is_eos & finite  # an end-of-sentence candidate ranked within the first K finishes a hypothesis
    ended[:, k:] = False
    live = ~is_eos & finite
    live &= np.cumsum(live, axis=1) <= k  # the other candidates refill the K beams in rank order
    order = np.argsort(~live, axis=1, kind="stable")[:, :k]  # the live ones first, in rank order
    n_live = live.sum(axis=1).tolist()
    sel_rows = np.take_along_axis(rows, order, axis=1)
    sel_tokens = np.take_along_axis(tokens, order, axis=1)
    sel_vals = np.take_along_axis(vals, order, axis=1)
    rows_list, tokens_list = sel_rows.tolist(), sel_tokens.tolist()
    any_ended = ended.any(axis=1).tolist()
    selects: list[IntArray] = []
    for i, search in enumerate(searches):
        opts = search.options
        if any_ended[i]:
            for r in np.flatnonzero(ended[i]).tolist():
                value = float(vals[i, r])
                score = normalise(value, search.t + 1, opts.length_penalty, opts.alpha)
                search.finished.append(Hypothesis(tuple(search.seqs[int(rows[i, r])]), score, value, None))
        m = n_live[i]
        search.t += 1
        if len(search.finished) >= k or m == 0:
            search.done = True
            selects.append(np.zeros(k, dtype=np.int64))
            continue
        live_rows, live_tokens = rows_list[i][:m], tokens_list[i][:m]
        pad = k - m
        search.seqs = [search.seqs[r] + [tok] for r, tok in zip(live_rows, live_tokens, strict=True)] + [[]] * pad
        if pad:
            search.scores = np.concatenate([sel_vals[i, :m], np.full(pad, NEG_INF, dtype=np.float32)])
            search.tokens = np.array(live_tokens + [search.pad] * pad, dtype=np.int64)
            selects.append(np.array(live_rows + [0] * pad, dtype=np.int64))
        else:
            search.scores, search.tokens = sel_vals[i], sel_tokens[i]
            selects.append(sel_rows[i])
        if search.t >= opts.max_len:
            search._finish_live()
    return selects


def _stack(rows: list[FloatArray], src_len: int) -> FloatArray:
    if not rows:
        return np.zeros((0, src_len), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


def resolve_lengths(
    src_len: int, max_length: int, max_ratio: float, min_length: int, min_ratio: float, default_max: int, hard_max: int
) -> tuple[int, int]:
    """Absolute (max_len, min_len) for a source from the absolute and ratio options."""
    max_len = max_length or default_max
    if max_ratio > 0:  # the product capped first: a huge ratio must not overflow an int
        max_len = min(max_len, max(1, math.ceil(min(max_ratio * src_len, hard_max))))
    max_len = min(max_len, hard_max)
    min_len = min_length
    if min_ratio > 0:
        min_len = max(min_len, math.floor(min(min_ratio * src_len, hard_max)))
    return max_len, min(min_len, max_len)
