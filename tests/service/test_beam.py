"""Beam search core against a fake runtime with a hand-made transition table."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine import batch as batch_module
from service.engine import beam as beam_module
from service.engine.batch import Job, decode_all
from service.engine.beam import (
    BeamSearch,
    OptionsError,
    SearchOptions,
    normalise,
    resolve_lengths,
    top_candidates_rows,
)
from tests.fakes import BOS, EOS, PAD, TableRuntime


@pytest.fixture(autouse=True, params=["one-by-one", "vectorised"])
def advance_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: searches advanced one by one, and plain ones together (``advance_plain``)."""
    monkeypatch.setattr(batch_module, "VECTORISE_FROM", 1 if request.param == "vectorised" else 10**9)
    return str(request.param)


def run(rt: TableRuntime, sources: list[list[int]], max_rows: int = 4096, **opts) -> list[Job]:
    options = SearchOptions(**opts)
    jobs = [Job(BeamSearch(options, len(s), BOS, EOS, PAD), s, tag=i) for i, s in enumerate(sources)]
    done = decode_all(rt, jobs, max_rows=max_rows)
    return sorted(done, key=lambda j: j.tag)


SOURCES = [[4, 5], [5, 5, 6], [6], [4, 6, 5, 4], [5, 4]]


@pytest.mark.parametrize("seed", range(6))
def test_beam_one_is_greedy(seed: int) -> None:
    rt = TableRuntime(seed=seed)
    for job, src in zip(run(rt, SOURCES, beam_size=1, max_len=6), SOURCES, strict=True):
        best = job.search.results()[0]
        tokens, log_prob = rt.greedy(src, 6)
        assert best.tokens == tokens
        assert best.log_prob == pytest.approx(log_prob, abs=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_wide_beam_is_exhaustive_search(seed: int) -> None:
    rt = TableRuntime(vocab=7, seed=seed)  # 3 real tokens: 3^4 = 81 sequences of length 4
    for job, src in zip(run(rt, SOURCES, beam_size=128, max_len=4), SOURCES, strict=True):
        best = job.search.results()[0]
        tokens, log_prob = rt.exhaustive(src, 4)
        assert best.tokens == tokens
        assert best.log_prob == pytest.approx(log_prob, abs=1e-5)


def test_exhaustive_vs_beam_vs_greedy() -> None:
    """The classic comparison: exhaustive search is never beaten, and a beam of 3 beats greedy more often than not.

    (Beam search is not monotone in K: with "stop at K finished" it can lose to greedy on some inputs.)
    """
    beam_better = beam_worse = 0
    for seed in range(30):
        rt = TableRuntime(vocab=7, seed=seed)
        src = [4, 5]
        greedy = run(rt, [src], beam_size=1, max_len=4)[0].search.results()[0].log_prob
        beam = run(rt, [src], beam_size=3, max_len=4)[0].search.results()[0].log_prob
        exhaustive = rt.exhaustive(src, 4)[1]
        assert exhaustive >= beam - 1e-6
        assert exhaustive >= greedy - 1e-6
        beam_better += beam > greedy + 1e-6
        beam_worse += beam < greedy - 1e-6
    assert beam_better > beam_worse


def test_finished_hypotheses_are_replaced_from_2k_candidates() -> None:
    """With EOS very likely, K beams still stay filled: ended hypotheses are refilled from the 2K candidates."""
    rt = TableRuntime(vocab=9, seed=3, eos_bias=3.0)
    job = run(rt, [[4, 5, 6]], beam_size=4, n_best=4, max_len=5)[0]
    results = job.search.results()
    assert len(results) == 4
    assert len({h.tokens for h in results}) == 4
    assert [h.score for h in results] == sorted((h.score for h in results), reverse=True)


def test_state_follows_its_hypothesis_after_reorder() -> None:
    """Every returned hypothesis's score equals the score of its own token sequence under the table."""
    rt = TableRuntime(vocab=8, seed=11)
    src = [4, 6, 5]
    job = run(rt, [src], beam_size=5, n_best=5, max_len=5)[0]
    for hyp in job.search.results():
        code, total, token = rt.start_code(src), np.float32(0.0), BOS
        for tok in (*hyp.tokens, EOS)[: 5 if len(hyp.tokens) == 5 else len(hyp.tokens) + 1]:
            code = rt.extend(code, token)
            total = np.float32(total + rt.dist(code)[tok])
            token = tok
        assert hyp.log_prob == pytest.approx(float(total), abs=1e-5)


def test_batched_equals_unbatched_and_rows_join_and_leave() -> None:
    rt = TableRuntime(seed=5)
    alone = [run(rt, [s], beam_size=3, n_best=3, max_len=6)[0] for s in SOURCES]
    rt_batched = TableRuntime(seed=5)
    together = run(rt_batched, SOURCES, beam_size=3, n_best=3, max_len=6, max_rows=6)  # 2 sources at a time
    for a, b in zip(alone, together, strict=True):
        assert [h.tokens for h in a.search.results()] == [h.tokens for h in b.search.results()]
        assert [h.score for h in a.search.results()] == pytest.approx([h.score for h in b.search.results()])
    assert max(rt_batched.rows_seen) <= 6
    assert any(j.joined_at_step > 0 for j in together)  # later sources joined the running batch mid-way


def test_min_length_and_max_length() -> None:
    rt = TableRuntime(seed=2, eos_bias=5.0)  # EOS almost certain
    short = run(rt, [[4]], beam_size=2, max_len=8)[0].search.results()[0]
    assert len(short.tokens) == 0
    longer = run(rt, [[4]], beam_size=2, max_len=8, min_len=3)[0].search.results()[0]
    assert len(longer.tokens) >= 3
    capped = run(TableRuntime(seed=2, eos_bias=-50.0), [[4]], beam_size=2, max_len=4)[0].search.results()[0]
    assert len(capped.tokens) == 4


def test_no_repeat_ngram_blocking() -> None:
    rt = TableRuntime(vocab=5, seed=1, eos_bias=-50.0)  # one real token: repetition is all it can do
    hyp = run(rt, [[4]], beam_size=1, max_len=6, no_repeat_ngram=2)[0].search.results()
    # after "4 4" the bigram (4, 4) is blocked and only EOS is left
    assert hyp[0].tokens == (4, 4)


def test_length_penalties() -> None:
    assert normalise(-6.0, 3, "avg", 0.0) == -2.0
    assert normalise(-6.0, 3, "gnmt", 1.0) == pytest.approx(-6.0 / (8 / 6))
    assert normalise(-6.0, 3, "none", 1.0) == -6.0


def test_coverage_penalty_prefers_covering_the_source() -> None:
    rt = TableRuntime(seed=4)
    plain = run(rt, [[4, 5, 6, 4, 5]], beam_size=4, n_best=4, max_len=6)[0].search.results()
    covered = run(rt, [[4, 5, 6, 4, 5]], beam_size=4, n_best=4, max_len=6, coverage_beta=1.0)[0].search.results()
    assert all(c.score <= c.log_prob + 1e-6 for c in covered)  # the penalty only lowers scores
    # the fake attends to one new position per token: covering the 5-token source needs longer outputs
    assert len(covered[0].tokens) > len(plain[0].tokens)


def test_sampling_is_seeded_and_needs_beam_one() -> None:
    rt = TableRuntime(seed=9)
    a = run(rt, SOURCES, beam_size=1, max_len=6, sampling=True, seed=42, temperature=1.5)
    b = run(rt, SOURCES, beam_size=1, max_len=6, sampling=True, seed=42, temperature=1.5)
    assert [j.search.results()[0].tokens for j in a] == [j.search.results()[0].tokens for j in b]
    top1 = run(rt, SOURCES, beam_size=1, max_len=6, sampling=True, seed=1, top_k=1)
    greedy = run(rt, SOURCES, beam_size=1, max_len=6)
    assert [j.search.results()[0].tokens for j in top1] == [j.search.results()[0].tokens for j in greedy]
    with pytest.raises(OptionsError):
        SearchOptions(beam_size=2, sampling=True).validate()


def test_attention_history_is_returned_per_token() -> None:
    rt = TableRuntime(seed=6)
    hyp = run(rt, [[4, 5, 6]], beam_size=2, max_len=5, keep_attention=True)[0].search.results()[0]
    assert hyp.attention is not None
    assert hyp.attention.shape == (len(hyp.tokens), 3)
    for t, row in enumerate(hyp.attention):  # the fake attends to position step % len
        assert int(np.argmax(row)) == t % 3


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 2, "n_best": 3}, "num_hypotheses"),
        ({"max_len": 0}, "max_length"),
        ({"max_len": 3, "min_len": 4}, "min_length"),
        ({"length_penalty": "x"}, "length_penalty"),
        ({"beam_size": 1, "sampling": True, "temperature": 0.0}, "temperature"),
    ],
)
def test_invalid_options_are_refused(opts: dict[str, object], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        SearchOptions(**opts).validate()  # type: ignore[arg-type]


def test_resolve_lengths() -> None:
    assert resolve_lengths(10, 0, 0.0, 0, 0.0, 50, 512) == (50, 0)
    assert resolve_lengths(10, 0, 1.5, 0, 0.5, 50, 512) == (15, 5)
    assert resolve_lengths(10, 100, 0.0, 0, 0.0, 50, 60) == (60, 0)
    # ratios so large that ratio x length overflows a float: capped at the hard limit, never an OverflowError
    assert resolve_lengths(10, 0, 1e308, 0, 1e308, 50, 512) == (50, 50)
    assert resolve_lengths(10, 0, 0.0, 7, 1e308, 40, 60) == (40, 40)


@pytest.mark.parametrize("limit", [1 << 16, 16], ids=["full-sort", "partial-sort"])
def test_top_candidates_rank_ties_by_lower_index(limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ranking paths equal a stable descending sort, ties at the cut included (batch invariance vs torch)."""
    monkeypatch.setattr(beam_module, "FULL_SORT_LIMIT", limit)
    rng = np.random.default_rng(0)
    for _ in range(200):
        rows, width, count = int(rng.integers(1, 6)), int(rng.integers(17, 200)), int(rng.integers(1, 12))
        # few distinct values: many ties, often exactly at the count-th place; some -inf (blocked tokens)
        cand = rng.choice(np.array([-np.inf, -3.0, -2.0, -1.5, -1.0], dtype=np.float32), size=(rows, width))
        expected = np.argsort(-cand, axis=1, kind="stable")[:, :count]
        np.testing.assert_array_equal(top_candidates_rows(cand, count), expected)
