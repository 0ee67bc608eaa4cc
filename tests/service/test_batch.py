"""The decode batch's encoder calls: sources of very different lengths are encoded in groups."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from service.engine.batch import DecodeBatch, Job, RowMemory, decode_all, encode_jobs, encoder_groups
from service.engine.beam import BeamSearch, SearchOptions
from tests.fakes import BOS, EOS, PAD, TableRuntime


def padded_cost(lengths: list[int], groups: list[list[int]], call_slots: int) -> int:
    return sum(call_slots + len(g) * max(lengths[i] for i in g) for g in groups)


def brute_force_cost(lengths: list[int], call_slots: int) -> int:
    """The cheapest split of the length-sorted sources into contiguous groups, by trying every split."""
    ordered = sorted(lengths)
    best = None
    for cuts in itertools.product([False, True], repeat=len(ordered) - 1):
        cost, start = 0, 0
        for i, cut in enumerate([*cuts, True]):
            if cut:
                cost += call_slots + (i + 1 - start) * ordered[i]
                start = i + 1
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(20))
def test_encoder_groups_are_the_cheapest_split(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=int(rng.integers(2, 11))).tolist()
    groups = encoder_groups(lengths, call_slots=12)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each source exactly once
    assert padded_cost(lengths, groups, 12) == brute_force_cost(lengths, 12)


def test_similar_lengths_stay_in_one_call_and_outliers_get_their_own() -> None:
    assert [sorted(g) for g in encoder_groups([7, 8, 8, 9, 7])] == [[0, 1, 2, 3, 4]]
    groups = encoder_groups([3] * 10 + [40])
    assert sorted(map(len, groups)) == [1, 10]


def test_grouped_encoding_keeps_each_source_with_its_own_state() -> None:
    """Sources of length 1..40 joined at once (several encoder calls) decode exactly as they do alone."""
    rng = np.random.default_rng(3)
    sources = [rng.integers(4, 7, size=n).tolist() for n in [1, 40, 2, 35, 3, 1, 38, 2]]
    options = SearchOptions(beam_size=3, n_best=3, max_len=6)

    def decode(srcs: list[list[int]], rt: TableRuntime) -> list[Job]:
        jobs = [Job(BeamSearch(options, len(s), BOS, EOS, PAD), s) for s in srcs]
        decode_all(rt, jobs, pad_id=PAD)  # all fit in max_rows: they join in one add, i.e. one grouped encode
        return jobs

    encoder_calls = 0
    rt = TableRuntime(seed=11)
    plain_encode = rt.encode

    def counting_encode(src: np.ndarray, src_len: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        nonlocal encoder_calls
        encoder_calls += 1
        return plain_encode(src, src_len)

    rt.encode = counting_encode  # type: ignore[method-assign]
    together = decode(sources, rt)
    assert encoder_calls > 1  # the long and the short sources were encoded apart
    for src, job in zip(sources, together, strict=True):
        alone = decode([src], TableRuntime(seed=11))[0]
        assert [h.tokens for h in job.search.results()] == [h.tokens for h in alone.search.results()]
        assert [h.score for h in job.search.results()] == pytest.approx([h.score for h in alone.search.results()])


def test_sources_dropped_while_being_encoded_never_join() -> None:
    """The encoder thread's output can arrive after a source was cancelled: its rows must not join."""
    options = SearchOptions(beam_size=2, n_best=2, max_len=5)
    sources = [[4, 5], [5, 6, 4], [6]]
    rt = TableRuntime(seed=4)
    jobs = [Job(BeamSearch(options, len(s), BOS, EOS, PAD), s) for s in sources]
    encoded = encode_jobs(rt, jobs, PAD, copy=False)
    jobs[1].dropped = True
    batch = DecodeBatch(rt, pad_id=PAD)
    batch.append(encoded)
    assert batch.jobs == [jobs[0], jobs[2]] and batch.rows == 4
    while batch.jobs:
        batch.step()
    for src, job in ((sources[0], jobs[0]), (sources[2], jobs[2])):
        alone = Job(BeamSearch(options, len(src), BOS, EOS, PAD), src)
        decode_all(TableRuntime(seed=4), [alone], pad_id=PAD)
        assert [h.tokens for h in job.search.results()] == [h.tokens for h in alone.search.results()]
    assert not jobs[1].search.finished  # never decoded


@pytest.mark.parametrize("seed", range(8))
def test_vectorised_advance_equals_one_by_one(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many plain searches of mixed beam sizes and lengths, with ties and -inf entries in the table."""
    from service.engine import batch as batch_module

    rng = np.random.default_rng(seed)
    sources = [rng.integers(4, 9, size=int(rng.integers(1, 6))).tolist() for _ in range(24)]
    beams = [1, 2, 4, 4, 4]

    def decode(threshold: int) -> list[Job]:
        monkeypatch.setattr(batch_module, "VECTORISE_FROM", threshold)
        jobs = [
            Job(
                BeamSearch(
                    SearchOptions(beam_size=beams[i % 5], n_best=beams[i % 5], max_len=7, min_len=i % 3),
                    len(s),
                    BOS,
                    EOS,
                    PAD,
                ),
                s,
                tag=i,
            )
            for i, s in enumerate(sources)
        ]
        return sorted(decode_all(TiedRuntime(seed), jobs, max_rows=40), key=lambda j: j.tag)

    for a, b in zip(decode(10**9), decode(1), strict=True):
        assert [(h.tokens, h.score, h.log_prob) for h in a.search.results()] == [
            (h.tokens, h.score, h.log_prob) for h in b.search.results()
        ]
        assert a.search.t == b.search.t


class TiedRuntime(TableRuntime):
    """Log-probabilities rounded to 0.5 (many exact ties), one real token never possible (-inf)."""

    def __init__(self, seed: int) -> None:
        super().__init__(vocab=9, seed=seed, eos_bias=1.0)

    def dist(self, code: int) -> np.ndarray:
        out = np.round(super().dist(code) * 2.0) / 2.0
        out[8] = -np.inf
        return out.astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_row_memory_matches_concatenate_and_index(seed: int) -> None:
    """The reusable buffers hold exactly what concatenating, padding and fancy-indexing fresh arrays gives."""
    rng = np.random.default_rng(seed)
    memory = RowMemory()
    expected = np.zeros((0, 0, 3), dtype=np.float32)
    for _ in range(40):
        if expected.shape[0] and rng.random() < 0.5:  # rows leave / reorder, memory narrows to the longest left
            index = rng.choice(expected.shape[0], size=int(rng.integers(1, expected.shape[0] + 1)), replace=False)
            width = int(rng.integers(1, expected.shape[1] + 1))
            memory.gather(index.astype(np.int64), width)
            expected = expected[index, :width]
        else:  # rows join, possibly wider or narrower than the batch
            new = rng.normal(size=(int(rng.integers(1, 9)), int(rng.integers(1, 12)), 3)).astype(np.float32)
            memory.append(new)
            width = max(expected.shape[1], new.shape[1])
            pad = [(0, 0), (0, 0), (0, 0)]
            old = np.pad(expected, [(0, 0), (0, width - expected.shape[1]), (0, 0)]) if expected.size else None
            pad[1] = (0, width - new.shape[1])
            expected = np.concatenate([old, np.pad(new, pad)]) if old is not None else np.pad(new, pad)
        view = memory.view()
        assert view.shape == expected.shape and view.flags.c_contiguous
        np.testing.assert_array_equal(view, expected)


class SpecialsFirstRuntime(TableRuntime):
    """A model that puts most of its probability on ``<pad>`` and ``<s>``, which are never outputs."""

    def dist(self, code: int) -> np.ndarray:
        logits = super().dist(code).astype(np.float64)
        logits[[PAD, BOS]] = 5.0
        return (logits - np.log(np.exp(logits).sum())).astype(np.float32)


@pytest.mark.parametrize(
    "options",
    [
        SearchOptions(beam_size=4, n_best=4, max_len=6),
        SearchOptions(beam_size=1, max_len=6),
        SearchOptions(beam_size=3, n_best=2, max_len=6, no_repeat_ngram=2),
        SearchOptions(beam_size=1, max_len=6, sampling=True, temperature=50.0, seed=3),
    ],
    ids=["beam", "greedy", "beam-one-by-one", "sampling"],
)
def test_pad_and_bos_are_never_generated(options: SearchOptions) -> None:
    jobs = [Job(BeamSearch(options, 3, BOS, EOS, PAD), [4, 5, i % 3 + 4], tag=i) for i in range(8)]
    for job in decode_all(SpecialsFirstRuntime(vocab=7), jobs):
        hyps = job.search.results()
        assert hyps and all(PAD not in h.tokens and BOS not in h.tokens for h in hyps)
        assert all(h.log_prob > -1e8 for h in hyps)  # real tokens, not masked ones
