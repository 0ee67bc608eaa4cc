"""The graphone n-gram scorer: exact Viterbi scores against brute force, files, errors."""

from __future__ import annotations

import gc
import itertools
import math
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.runtime.graphone import HASH_MULTIPLIER, LN10, GraphoneError, GraphoneModel, graphone, hash_table, quantize

# a hand-written bigram model over graphones (log10), with backoff weights
ARPA = """
\\data\\
ngram 1=8
ngram 2=6

\\1-grams:
-99 <s> -0.30
-0.90 </s>
-0.60 a}AH -0.20
-1.20 b}B -0.10
-1.50 a|b}AE|B
-1.30 c}K -0.25
-1.70 c}_
-2.00 b}_

\\2-grams:
-0.20 <s> a}AH
-0.70 <s> a|b}AE|B
-0.30 a}AH b}B
-0.40 b}B c}K
-0.15 c}K </s>
-0.50 a|b}AE|B c}_

\\end\\
"""


@pytest.fixture
def arpa(tmp_path: Path) -> Path:
    path = tmp_path / "g.arpa"
    path.write_text(ARPA, encoding="utf-8")
    return path


def parse_arpa(text: str) -> dict[tuple[str, ...], tuple[float, float]]:
    """n-gram -> (log10 probability, log10 back-off weight), read by hand."""
    probs: dict[tuple[str, ...], tuple[float, float]] = {}
    order = 0
    for line in text.strip().splitlines():
        line = line.strip()
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1])
            continue
        if not line or line.startswith(("\\", "ngram")):
            continue
        parts = line.split()
        probs[tuple(parts[1 : 1 + order])] = (float(parts[0]), float(parts[1 + order]) if len(parts) > 1 + order else 0)
    return probs


def backoff_log_p(probs: dict[tuple[str, ...], tuple[float, float]], history: tuple[str, ...], token: str) -> float:
    """The ARPA back-off rule: the n-gram's probability, else the history's back-off weight (1 when the history is
    not an n-gram) times the probability given the history without its oldest token."""
    if (*history, token) in probs:
        return probs[(*history, token)][0]
    if not history:
        raise KeyError(token)
    return probs.get(history, (0.0, 0.0))[1] + backoff_log_p(probs, history[1:], token)


def brute_force(model_lines: str, source: list[str], target: list[str]) -> float | None:
    """Best segmentation score by enumerating every segmentation and applying the backoff rule by hand."""
    probs = parse_arpa(model_lines)

    def segmentations(i: int, j: int) -> Iterator[list[str]]:
        if i == len(source):
            if j == len(target):
                yield []
            return
        for a, b in itertools.product((1, 2), (0, 1, 2)):
            if i + a <= len(source) and j + b <= len(target):
                for rest in segmentations(i + a, j + b):
                    yield [graphone(source[i : i + a], target[j : j + b]), *rest]

    best = None
    for seg in segmentations(0, 0):
        if any((tok,) not in probs for tok in seg):
            continue
        seq = ["<s>", *seg, "</s>"]
        total = sum(backoff_log_p(probs, (seq[k - 1],), seq[k]) for k in range(1, len(seq)))
        best = total if best is None else max(best, total)
    return None if best is None else best * LN10


@pytest.mark.parametrize(
    "source,target",
    [
        ("abc", ["AH", "B", "K"]),
        ("abc", ["AE", "B"]),  # two segmentations compete: a|b}AE|B c}_ and a}AH ... (impossible here)
        ("ab", ["AH", "B"]),
        ("abcb", ["AH", "B", "K"]),
        ("cab", ["K", "AH", "B"]),  # unseen bigrams: backoff only
    ],
)
def test_viterbi_score_equals_the_best_segmentation(arpa: Path, source: str, target: list[str]) -> None:
    model = GraphoneModel.from_arpa(arpa)
    got = model.score(list(source), target, beam=100)
    want = brute_force(ARPA, list(source), target)
    assert want is not None and got is not None
    assert math.isclose(got, want, rel_tol=1e-6)


def test_pairs_without_a_segmentation_score_none(arpa: Path) -> None:
    model = GraphoneModel.from_arpa(arpa)
    assert model.score(list("abc"), ["Z"]) is None  # no graphone produces Z
    assert model.score([], ["AH"]) is None
    assert model.score(list("a"), ["AH", "B", "K"]) is None  # three targets cannot come from one letter


def test_strip_normalises_targets_and_survives_a_round_trip(arpa: Path, tmp_path: Path) -> None:
    model = GraphoneModel.from_arpa(arpa, strip="[0-9]")
    plain = model.score(list("abc"), ["AH", "B", "K"])
    assert model.score(list("abc"), ["AH0", "B", "K"]) == plain
    path = tmp_path / "g.npz"
    model.save(path)
    loaded = GraphoneModel.load(path)
    assert loaded.strip == "[0-9]" and loaded.order == 2 and loaded.size == model.size
    for source, target in (("abc", ["AH1", "B", "K"]), ("abc", ["AE", "B"]), ("cab", ["K", "AH", "B"])):
        assert loaded.score(list(source), target) == model.score(list(source), target)


def test_bad_files_raise_graphone_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.arpa"
    bad.write_text("\\data\\\n\\1-grams:\n-1.0 <s>\n-1.0\n", encoding="utf-8")
    with pytest.raises(GraphoneError, match=r"bad.arpa:4"):
        GraphoneModel.from_arpa(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(GraphoneError, match="cannot read the graphone model"):
        GraphoneModel.load(junk)
    with pytest.raises(GraphoneError, match="not a regular expression"):
        GraphoneModel.from_arpa(tmp_path / "missing.arpa", strip="[")


def test_scoring_many_targets_at_once_equals_scoring_each(arpa: Path) -> None:
    """Targets sharing prefixes (and equal after normalisation) share the search, never its result."""
    model = GraphoneModel.from_arpa(arpa, strip="[0-9]")
    targets = [["AH", "B", "K"], ["AH0", "B", "K"], ["AE", "B"], ["AH", "B"], ["Z"], ["AH", "B", "K", "K"]]
    together = model.score_many(list("abc"), targets, beam=100)
    assert together == [model.score_many(list("abc"), [t], beam=100)[0] for t in targets]
    assert together[0] == together[1] and together[0] is not None and together[4] is None
    assert model.score_many([], targets) == [None] * len(targets)


def test_bundles_with_the_same_ngram_share_one_copy(arpa: Path, tmp_path: Path) -> None:
    path = tmp_path / "g.npz"
    GraphoneModel.from_arpa(arpa).save(path)
    first = GraphoneModel.shared(path, "sha-1")
    assert GraphoneModel.shared(path, "sha-1") is first
    assert GraphoneModel.shared(path, "sha-2") is not first  # another file's hash: another copy
    released = weakref.ref(first)
    del first
    gc.collect()
    assert released() is None  # the share does not keep a model alive once no bundle holds it
    assert GraphoneModel.shared(path, "sha-1").score(list("abc"), ["AH", "B", "K"]) is not None


def random_arpa(rng: np.random.Generator, n_tokens: int = 30, per_order: int = 1500, order: int = 3) -> str:
    """A prefix-closed ARPA model with thousands of distinct values (more than the codebooks' 1,024 levels)."""
    tokens = ["<s>", "</s>", *(f"t{i}}}X{i}" for i in range(n_tokens))]
    grams: list[list[tuple[str, ...]]] = [[(t,) for t in tokens]]
    for _ in range(2, order + 1):
        lower = grams[-1]
        found = {(*lower[rng.integers(len(lower))], tokens[rng.integers(len(tokens))]) for _ in range(per_order)}
        grams.append(sorted(found))
    lines = ["\\data\\", *(f"ngram {k}={len(g)}" for k, g in enumerate(grams, 1))]
    for k, order_grams in enumerate(grams, 1):
        lines += ["", f"\\{k}-grams:"]
        for gram in order_grams:
            backoff = "" if k == order else (" 0" if rng.random() < 0.2 else f" {-rng.random():.6f}")
            lines.append(f"{-6 * rng.random():.6f} {' '.join(gram)}{backoff}")
    return "\n".join([*lines, "", "\\end\\", ""])


def test_the_file_is_a_quantized_trie_that_keeps_every_ngram(tmp_path: Path) -> None:
    arpa = tmp_path / "r.arpa"
    arpa.write_text(random_arpa(np.random.default_rng(0)), encoding="utf-8")
    model = GraphoneModel.from_arpa(arpa)
    path = tmp_path / "r.npz"
    model.save(path)
    loaded = GraphoneModel.load(path)
    before, after = model.ngrams(), loaded.ngrams()
    assert len(before) == len(after) == 3
    for old, new in zip(before, after, strict=True):
        assert np.array_equal(old.ids, new.ids)  # every n-gram kept, in the same (lexicographic) order
        assert np.array_equal(old.backoff == 0, new.backoff == 0)  # zero back-off weights stay exactly zero
    error = np.abs(
        np.concatenate(
            [np.r_[a.log_prob - b.log_prob, a.backoff - b.backoff] for a, b in zip(before, after, strict=True)]
        )
    )
    assert 0 < error.max() < 0.05 and error.mean() < 0.005  # lossy above the unigrams, but fine-grained
    assert np.array_equal(before[0].log_prob, after[0].log_prob)  # unigrams are exact
    assert np.array_equal(before[0].backoff, after[0].backoff)
    again = tmp_path / "again.npz"
    loaded.save(again)  # a quantized model is stored exactly: re-saving changes nothing
    with np.load(path) as first, np.load(again) as second:
        assert first.files == second.files
        assert all(np.array_equal(first[name], second[name]) for name in first.files)
    assert path.stat().st_size < 0.6 * arpa.stat().st_size


def test_scores_follow_the_backoff_rule_where_suffixes_are_missing(tmp_path: Path) -> None:
    """A random prefix-closed 4-gram model lacks many suffixes (``b c`` of ``a b c``): a history backs off past
    them to the longest suffix the model has, as the ARPA back-off rule does with their weight of 1."""
    rng = np.random.default_rng(3)
    text = random_arpa(rng, n_tokens=8, per_order=120, order=4)
    arpa = tmp_path / "r.arpa"
    arpa.write_text(text, encoding="utf-8")
    model = GraphoneModel.from_arpa(arpa)
    probs = parse_arpa(text)
    prefixes = sorted({gram[:3] for gram in probs if len(gram) == 4})  # follow the model's 4-grams often
    for _ in range(300):
        first = prefixes[rng.integers(len(prefixes))] if rng.random() < 0.7 else ()
        rest = [f"t{i}}}X{i}" for i in rng.integers(0, 8, size=rng.integers(1, 5))]
        seq = [t for t in [*first, *rest] if t not in ("<s>", "</s>")]
        if not seq:
            continue
        source = [t.split("}")[0] for t in seq]
        target = [t.split("}")[1] for t in seq]
        words = ["<s>", *seq, "</s>"]
        want = LN10 * sum(backoff_log_p(probs, tuple(words[max(0, k - 3) : k]), words[k]) for k in range(1, len(words)))
        assert model.score(source, target) == pytest.approx(want, rel=1e-5, abs=1e-4)


def probe(slots: np.ndarray[Any, Any], keys: np.ndarray[Any, Any], key: int) -> int:
    """A lookup as the scorer does it: linear probing from the key's home slot to the key or an empty slot."""
    bits = len(slots).bit_length() - 1
    slot = ((key * HASH_MULTIPLIER) & ((1 << 64) - 1)) >> (64 - bits)
    while slots[slot] and keys[slots[slot]] != key:
        slot = (slot + 1) & (len(slots) - 1)
    return int(slots[slot])


@pytest.mark.parametrize("count", [1, 7, 300, 5000])
def test_every_key_is_found_in_the_hash_table(count: int) -> None:
    rng = np.random.default_rng(count)
    bits = max(4, (2 * count).bit_length())
    # keys whose home is the last slot run past the end of the table and wrap around to its start
    last = [k for k in range(1, 200_000) if ((k * HASH_MULTIPLIER) & ((1 << 64) - 1)) >> (64 - bits) == 2**bits - 1]
    chosen = sorted(set(rng.choice(10**9, size=count, replace=False).tolist()) | set(last[: min(count, 4)]))
    keys = np.asarray([0, *chosen], dtype=np.int64)  # index 0 is never stored: 0 marks an empty slot
    slots = hash_table(keys, 1)
    assert len(slots) >= 2 * (len(keys) - 1) and np.count_nonzero(slots) == len(keys) - 1
    assert all(probe(slots, keys, int(k)) == i for i, k in enumerate(keys[1:], 1))
    absent = set(rng.integers(0, 10**9, size=200).tolist()) - set(chosen)
    assert all(probe(slots, keys, k) == 0 for k in absent)


def test_quantize_is_exact_for_few_values_and_keeps_zero() -> None:
    few = np.asarray([-1.5, 0.0, -1.5, -2.25], dtype=np.float32)
    codes, book = quantize(few)
    assert np.array_equal(book[codes], few)
    many = np.random.default_rng(1).normal(-3, 1, 50_000).astype(np.float32)
    many[::7] = 0.0
    codes, book = quantize(many, bits=8)
    assert len(book) <= 256 and np.all(book[codes][::7] == 0.0)
    coarse = np.abs(book[codes] - many).mean()
    codes, book = quantize(many)  # the default, 10 bits
    assert len(book) <= 1024 and np.all(book[codes][::7] == 0.0)
    assert np.abs(book[codes] - many).mean() < coarse / 2 < 0.005  # least squares: fine where values are many


def test_format_1_files_still_load(arpa: Path, tmp_path: Path) -> None:
    model = GraphoneModel.from_arpa(arpa, strip="[0-9]")
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "format": np.asarray([1]),
        "tokens": np.asarray(model.tokens, dtype=str),
        "strip": np.asarray([model.strip], dtype=str),
    }
    for k, grams in enumerate(model.ngrams(), 1):
        arrays |= {f"ids{k}": grams.ids.astype(np.uint16), f"log_prob{k}": grams.log_prob, f"backoff{k}": grams.backoff}
    path = tmp_path / "v1.npz"
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    loaded = GraphoneModel.load(path)
    assert loaded.score(list("abc"), ["AH1", "B", "K"]) == model.score(list("abc"), ["AH1", "B", "K"])
    arrays["format"] = np.asarray([7])
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(GraphoneError, match="format 1 or 2"):
        GraphoneModel.load(path)


def test_a_model_without_prefixes_is_refused(tmp_path: Path) -> None:
    arpa = tmp_path / "holes.arpa"
    arpa.write_text(
        ARPA.replace("ngram 2=6", "ngram 2=6\nngram 3=1").replace(
            "\\end\\", "\\3-grams:\n-0.1 c}K a}AH b}B\n\n\\end\\"
        ),
        encoding="utf-8",
    )
    with pytest.raises(GraphoneError, match="the 3-gram prefix c}K a}AH is not in the model"):
        GraphoneModel.from_arpa(arpa)  # a back-off model needs "c}K a}AH" as a 2-gram (its back-off weight)


def test_a_damaged_trie_is_refused_in_one_line(tmp_path: Path) -> None:
    arpa = tmp_path / "r.arpa"
    arpa.write_text(random_arpa(np.random.default_rng(2), per_order=50), encoding="utf-8")
    path = tmp_path / "r.npz"
    GraphoneModel.from_arpa(arpa).save(path)
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["prefix3"] = arrays["prefix3"].astype(np.uint32) + 10_000  # prefixes past the end of the 2-grams
    np.savez_compressed(path, **arrays)
    with pytest.raises(GraphoneError, match="cannot read the graphone model"):
        GraphoneModel.load(path)
