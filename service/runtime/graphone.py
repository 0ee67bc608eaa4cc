"""Joint-sequence (graphone) n-gram model: a second opinion on the beam's n-best list.

A graphone pairs a chunk of 1-2 source tokens with a chunk of 0-2 target tokens (``o|u}AW``, ``e}_``); the
model is a backoff n-gram over graphone sequences (Bisani & Ney 2008; the Phonetisaurus recipe of Novak et al.
2016 builds it from a many-to-many alignment). It scores a (source, hypothesis) pair by its best segmentation into
graphones (Viterbi with a small beam per lattice cell). The neural model and the n-gram make different errors,
so adding the n-gram's log-probability to the beam's score re-ranks the n-best list for the better
(``docs/export.md#rescoring``).

Pure Python and numpy: the server loads it from a bundle's ``graphone.npz`` (written by ``seqserve graphone``).
The file stores the n-grams as a trie (each n-gram: its last token and the index of its (n-1)-gram prefix) and the
values of orders >= 2 as codes into a codebook of 1,024 levels per order and kind, as KenLM quantizes its binary
models; the unigrams stay exact. (With 8 bits the shipped 7-gram re-ranked dev 0.07 points worse than in float32;
with 10 bits the same as float32.) Loaded, the trie is flat arrays with a hash table over its (prefix, token) keys
(:class:`Trie`): ≈ 30 MB for the shipped 7-gram, where Python dictionaries took 93 MB, and as fast to score with.
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SEQ_SEP = "|"  # joins the tokens of one side of a graphone
SIDE_SEP = "}"  # between the source side and the target side
EMPTY = "_"  # an empty target side
RESERVED = (SEQ_SEP, SIDE_SEP, EMPTY)
BOS, EOS = "<s>", "</s>"
MAX_SOURCE_CHUNK = 2
MAX_TARGET_CHUNK = 2
LN10 = math.log(10.0)
FORMAT = 2  # 2: trie + codebooks; 1 (still read): every n-gram's token ids and float32 values
READABLE_FORMATS = (1, 2)
QUANTIZE_BITS = 10
LLOYD_ITERATIONS = 5
HASH_MULTIPLIER = 0x9E3779B97F4A7C15  # Fibonacci hashing: a key's slot is the top bits of key * 2**64 / golden ratio
MASK64 = (1 << 64) - 1
CACHE_LIMIT = 100_000  # remembered (history, token) steps (≈ 30 MB); common graphone histories repeat across words


_SHARED: weakref.WeakValueDictionary[str, GraphoneModel] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()  # bundles load on worker threads


class GraphoneError(ValueError):
    """A graphone model file or ARPA file that cannot be used."""


def graphone(source: Sequence[str], target: Sequence[str]) -> str:
    return SEQ_SEP.join(source) + SIDE_SEP + (SEQ_SEP.join(target) if target else EMPTY)


@dataclass(frozen=True)
class NGrams:
    """The n-grams of one order: token ids (1-based) [n, order], log-probability and backoff (natural log) [n]."""

    ids: npt.NDArray[np.integer[Any]]  # int64 when read from ARPA, the file's uint16 / int32 when loaded
    log_prob: npt.NDArray[np.float32]
    backoff: npt.NDArray[np.float32]


def quantize(
    values: npt.NDArray[np.float32], bits: int = QUANTIZE_BITS
) -> tuple[npt.NDArray[np.unsignedinteger[Any]], npt.NDArray[np.float32]]:
    """Codes and codebook (ascending) with ``codebook[codes] ≈ values``; exact when there are at most 2**bits
    distinct values, so re-saving a loaded model writes the same arrays. Otherwise 0.0 (a back-off weight of 1)
    keeps its own level and the other values share the rest, placed by Lloyd's algorithm (least squared error,
    weighted by how often each value occurs) from levels spread evenly over the distinct values, so the rare
    extremes keep levels of their own."""
    unique, inverse = np.unique(values, return_inverse=True)
    if len(unique) <= 2**bits:
        return smallest_uint(inverse.ravel()), unique.astype(np.float32)
    flat = values.astype(np.float64).ravel()
    distinct, counts = np.unique(flat[flat != 0.0], return_counts=True)
    levels = 2**bits - (1 if (flat == 0.0).any() else 0)
    centers = distinct[np.linspace(0, len(distinct) - 1, levels).round().astype(np.int64)]
    for _ in range(LLOYD_ITERATIONS):
        bins = np.searchsorted((centers[1:] + centers[:-1]) / 2, distinct)
        weight = np.bincount(bins, weights=counts, minlength=levels)
        total = np.bincount(bins, weights=distinct * counts, minlength=levels)
        centers = np.where(weight > 0, total / np.maximum(weight, 1.0), centers)
    codes = np.searchsorted((centers[1:] + centers[:-1]) / 2, flat)
    approx = np.where(flat == 0.0, 0.0, centers[codes]).astype(np.float32)
    return quantize(approx, bits)  # now at most 2**bits distinct values: the exact (canonical) form


def smallest_uint(values: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.unsignedinteger[Any]]:
    top = int(values.max()) if len(values) else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.uint64)


def target_pattern(strip: str) -> re.Pattern[str] | None:
    """The compiled ``strip`` expression (None when empty)."""
    if not strip:
        return None
    try:
        return re.compile(strip)
    except re.error as exc:
        raise GraphoneError(f"the strip pattern {strip!r} is not a regular expression: {exc}") from None


def normalise(tokens: Sequence[str], pattern: re.Pattern[str] | None) -> list[str]:
    """Target tokens as the graphone model sees them: ``pattern`` removed, tokens left empty dropped."""
    if pattern is None:
        return list(tokens)
    return [t for t in (pattern.sub("", tok) for tok in tokens) if t]


def sorted_index(keys: npt.NDArray[np.int64], wanted: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The index of each wanted key in the ascending ``keys``, 0 where it is absent (index 0 is the trie's root)."""
    index = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[index] == wanted, index, 0)


@dataclass(frozen=True)
class Level:
    """The n-grams of one order in trie form, in lexicographic order: each one's (n-1)-gram prefix as an index
    among the previous order's n-grams (unused for the unigrams), its last token, log-probability and back-off
    weight (natural log)."""

    parent: npt.NDArray[np.int64]
    token: npt.NDArray[np.int64]
    log_prob: npt.NDArray[np.float32]
    backoff: npt.NDArray[np.float32]


@dataclass(frozen=True)
class Trie:
    """A model's n-grams in flat arrays. Index 0 is the root (the empty history), 1..T the unigrams (n-gram i is
    token i), then each higher order in lexicographic order. ``keys[i]`` = index of n-gram i's (n-1)-gram prefix
    * base + its last token: ascending over the whole array, so one sorted search finds any n-gram. ``slots`` is an
    open-addressing hash table (linear probing, 0 = empty) over the keys of orders >= 2 with twice as many slots as
    keys: what the scorer probes, one n-gram at a time."""

    offsets: list[int]  # order k's n-grams are offsets[k-1] .. offsets[k]-1
    keys: npt.NDArray[np.int64]
    log_prob: npt.NDArray[np.float32]
    backoff: npt.NDArray[np.float32]
    suffix: npt.NDArray[np.int32]  # the longest proper suffix that is an n-gram (the root for unigrams)
    level: npt.NDArray[np.int8]  # the n-gram's order (0 for the root)
    slots: npt.NDArray[np.int32]

    @staticmethod
    def levels_of(orders: Sequence[NGrams], base: int, tokens: Sequence[str]) -> list[Level]:
        """Token-id rows (any order within an order) -> trie form; every n-gram's prefix must be in the model."""
        ids1 = orders[0].ids.reshape(-1).astype(np.int64)
        if not np.array_equal(np.sort(ids1), np.arange(1, base)):
            raise GraphoneError("the unigrams must be the tokens, each once")
        first = np.argsort(ids1)
        levels = [Level(np.zeros(base - 1, np.int64), ids1[first], orders[0].log_prob[first], orders[0].backoff[first])]
        keys = np.arange(base, dtype=np.int64)  # the root and the unigrams: key = token
        offset = 1  # of the previous order's first n-gram
        for k in range(2, len(orders) + 1):
            ids = orders[k - 1].ids.reshape(-1, k).astype(np.int64)
            node = ids[:, 0].copy()
            for col in range(1, k - 1):  # walk down the trie to each row's prefix
                node = np.where(node > 0, sorted_index(keys, node * base + ids[:, col]), 0)
            if not node.all():
                missing = ids[int(np.argmin(node > 0)), :-1]
                raise GraphoneError(
                    f"the {k}-gram prefix {' '.join(tokens[i - 1] for i in missing)} is not in the model; every "
                    "n-gram's (n-1)-gram prefix must be (ARPA files from MITLM, KenLM and SRILM have them)"
                )
            key = node * base + ids[:, -1]
            order = np.argsort(key, kind="stable")
            grams = orders[k - 1]
            levels.append(Level(node[order] - offset, ids[order, -1], grams.log_prob[order], grams.backoff[order]))
            offset = len(keys)
            keys = np.concatenate([keys, key[order]])
        return levels

    @classmethod
    def build(cls, levels: Sequence[Level], base: int) -> Trie:
        if not np.array_equal(levels[0].token, np.arange(1, base)):
            raise GraphoneError("the unigrams must be the tokens, in order")
        offsets = [1, base]
        keys = [np.arange(base, dtype=np.int64)]
        for k, level in enumerate(levels[1:], 2):
            if len(level.token) and (level.parent.min() < 0 or level.parent.max() >= offsets[-1] - offsets[-2]):
                raise GraphoneError(f"the {k}-grams refer to {k - 1}-grams the model does not have")
            keys.append((offsets[-2] + level.parent) * base + level.token)
            offsets.append(offsets[-1] + len(level.token))
        all_keys = np.concatenate(keys)
        del keys
        if not np.all(np.diff(all_keys) > 0):
            raise GraphoneError("the n-grams are not in lexicographic order, or one is listed twice")
        suffix = np.zeros(len(all_keys), dtype=np.int64)
        for k in range(2, len(levels) + 1):  # w2..wk, else the longest shorter suffix; the last token always is one
            chosen = np.arange(offsets[k - 1], offsets[k])
            token = all_keys[chosen] % base
            context = suffix[all_keys[chosen] // base]  # the prefix's suffix: w2..w(k-1) or shorter
            found = np.zeros(len(chosen), dtype=np.int64)
            while (todo := np.flatnonzero(found == 0)).size:
                index = sorted_index(all_keys, context[todo] * base + token[todo])  # never the root: tokens are >= 1
                hit = index > 0
                found[todo[hit]] = index[hit]
                context[todo[~hit]] = suffix[context[todo[~hit]]]
            suffix[chosen] = found
        order_of = np.repeat(np.arange(len(offsets), dtype=np.int8), np.diff([0, *offsets]))
        slots = hash_table(all_keys, offsets[1])
        return cls(
            offsets,
            all_keys,
            np.concatenate([np.zeros(1, np.float32), *(lv.log_prob.astype(np.float32) for lv in levels)]),
            np.concatenate([np.zeros(1, np.float32), *(lv.backoff.astype(np.float32) for lv in levels)]),
            suffix.astype(np.int32),
            order_of,
            slots,
        )


def hash_table(keys: npt.NDArray[np.int64], start: int) -> npt.NDArray[np.int32]:
    """Open-addressing table (linear probing, 0 = empty) of the indices start.. of ``keys``, twice as many slots
    as keys: the key's home slot is the top bits of key * HASH_MULTIPLIER (mod 2**64). Built without a probing loop:
    in order of home slot, each key takes max(its home, the previous key's slot + 1); the few keys that run past the
    end then wrap around into the first free slots. Every slot between a key's home and its slot is taken, which
    is all a lookup needs."""
    count = len(keys) - start
    bits = max(4, (2 * count).bit_length())
    size = 1 << bits
    home = ((keys[start:].astype(np.uint64) * np.uint64(HASH_MULTIPLIER)) >> np.uint64(64 - bits)).astype(np.int64)
    order = np.argsort(home, kind="stable")
    place = home[order]
    del home
    steps = np.arange(count, dtype=np.int64)
    place -= steps
    np.maximum.accumulate(place, out=place)
    place += steps  # position i >= home i and > position i-1
    del steps
    slots = np.zeros(size, dtype=np.int32)
    inside = place < size
    slots[place[inside]] = order[inside] + start
    wrapped = order[~inside] + start
    if len(wrapped):  # past the end: the first free slots from 0 on
        slots[np.flatnonzero(slots == 0)[: len(wrapped)]] = wrapped
    return slots


def flat(typecode: str, values: npt.NDArray[Any]) -> array[Any]:
    """``values`` as an ``array.array`` (whose items read back as Python numbers), copied once."""
    out = array(typecode)
    out.frombytes(np.ascontiguousarray(values).data.cast("B"))
    return out


class GraphoneModel:
    def __init__(self, tokens: Sequence[str], levels: Sequence[Level], strip: str = "") -> None:
        if not levels or BOS not in tokens or EOS not in tokens:
            raise GraphoneError("a graphone model needs unigrams including <s> and </s>")
        self.strip = strip  # removed from every target token before scoring (e.g. "[0-9]": ARPAbet stress)
        self._pattern = target_pattern(strip)
        self.tokens = list(tokens)
        self.order = len(levels)
        self._ids = {tok: i + 1 for i, tok in enumerate(self.tokens)}  # 0 is the root of the trie, never a token
        self._base = len(self.tokens) + 1
        trie = Trie.build(levels, self._base)
        self._offsets = trie.offsets
        # the model as flat arrays (array.array: indexing one gives a Python number, several times faster than
        # numpy's scalars): n-gram i's key (parent * base + last token), natural-log probability and back-off
        # weight, suffix (its longest proper suffix that is an n-gram, as a history) and that suffix's order
        self._keys = flat("q", trie.keys)
        self._lp = flat("f", trie.log_prob)
        self._bo = flat("f", trie.backoff)
        self._suffix = flat("i", trie.suffix)
        self._level = flat("b", trie.level)
        self._slots = flat("i", trie.slots)
        self._mask = len(trie.slots) - 1
        self._shift = 64 - self._mask.bit_length()
        self._bos = self._ids[BOS]
        self._eos = self._ids[EOS]
        self.size = len(self._keys) - 1
        # (history, length, token) -> (log p, next history, next length); dict operations are atomic under the
        # GIL, so threads may share it
        self._steps: dict[tuple[int, int, int], tuple[float, int, int]] = {}

    # ------------------------------------------------------------------ files
    @classmethod
    def from_arpa(cls, path: Path, strip: str = "") -> GraphoneModel:
        """An ARPA back-off model (log10) over graphone tokens, as ``estimate-ngram -wl`` writes it."""
        target_pattern(strip)  # a bad pattern fails before the file is read
        tokens: list[str] = []
        ids: dict[str, int] = {}
        rows: dict[int, tuple[list[list[int]], list[float], list[float]]] = {}
        order = 0
        try:
            with path.open(encoding="utf-8") as f:
                for lineno, raw in enumerate(f, 1):
                    line = raw.strip()
                    if not line or line == "\\data\\" or line.startswith("ngram "):
                        continue
                    if line == "\\end\\":
                        break
                    if line.startswith("\\") and line.endswith("-grams:"):
                        order = int(line[1 : line.index("-")])
                        rows[order] = ([], [], [])
                        continue
                    if order == 0:
                        raise GraphoneError(f"{path}:{lineno}: n-gram line before any \\N-grams: section")
                    parts = line.split()
                    if len(parts) not in (order + 1, order + 2):
                        raise GraphoneError(
                            f"{path}:{lineno}: expected {order} tokens, a log-probability and an optional backoff"
                        )
                    words = parts[1 : order + 1]
                    if order == 1:
                        ids[words[0]] = len(tokens) + 1
                        tokens.append(words[0])
                    try:
                        gram = [ids[w] for w in words]
                    except KeyError as exc:
                        raise GraphoneError(f"{path}:{lineno}: {exc.args[0]!r} is not a unigram") from None
                    rows[order][0].append(gram)
                    rows[order][1].append(float(parts[0]) * LN10)
                    rows[order][2].append(float(parts[order + 1]) * LN10 if len(parts) == order + 2 else 0.0)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if isinstance(exc, GraphoneError):
                raise
            raise GraphoneError(f"cannot read the ARPA file {path}: {exc}") from None
        if sorted(rows) != list(range(1, len(rows) + 1)) or not rows:
            raise GraphoneError(f"{path}: the ARPA file needs \\1-grams: .. \\N-grams: sections")
        orders = [
            NGrams(
                np.asarray(rows[k][0], dtype=np.int64).reshape(-1, k),
                np.asarray(rows[k][1], dtype=np.float32),
                np.asarray(rows[k][2], dtype=np.float32),
            )
            for k in sorted(rows)
        ]
        return cls(tokens, Trie.levels_of(orders, len(tokens) + 1, tokens), strip)

    def save(self, path: Path) -> None:
        """Write the model as a trie with codebooks (format 2): lossy above the unigrams, ≈ 2.5x smaller
        than float32 arrays."""
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "format": np.asarray([FORMAT]),
            "tokens": np.asarray(self.tokens, dtype=str),
            "strip": np.asarray([self.strip], dtype=str),
        }
        for k, level in enumerate(self.levels(), 1):
            if k == 1:
                arrays["log_prob1"], arrays["backoff1"] = level.log_prob, level.backoff
                continue
            arrays[f"token{k}"] = smallest_uint(level.token)
            arrays[f"prefix{k}"] = smallest_uint(np.diff(level.parent, prepend=0))  # non-decreasing: small steps
            arrays[f"log_prob_code{k}"], arrays[f"log_prob_book{k}"] = quantize(level.log_prob)
            arrays[f"backoff_code{k}"], arrays[f"backoff_book{k}"] = quantize(level.backoff)
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

    def levels(self) -> list[Level]:
        """The model's n-grams by order in trie form (what the file stores; values float32)."""
        keys = np.frombuffer(self._keys, dtype=np.int64)
        log_prob = np.frombuffer(self._lp, dtype=np.float32)
        backoff = np.frombuffer(self._bo, dtype=np.float32)
        out = []
        for k in range(1, self.order + 1):
            chosen = slice(self._offsets[k - 1], self._offsets[k])
            parent = keys[chosen] // self._base - (self._offsets[k - 2] if k > 1 else 0)  # among the (k-1)-grams
            out.append(Level(parent, keys[chosen] % self._base, log_prob[chosen].copy(), backoff[chosen].copy()))
        return out

    def ngrams(self) -> list[NGrams]:
        """The model's n-grams by order (token ids int64 in lexicographic order, values float32)."""
        out: list[NGrams] = []
        ids = np.zeros((1, 0), dtype=np.int64)  # the root: no tokens
        for level in self.levels():
            ids = np.concatenate([ids[level.parent], level.token[:, None]], axis=1)
            out.append(NGrams(ids, level.log_prob, level.backoff))
        return out

    @classmethod
    def shared(cls, path: Path, sha256: str) -> GraphoneModel:
        """:meth:`load`, or the model already loaded from a file with this sha256: bundles that carry the same
        n-gram (an fp32 bundle and its int8 twin, a reloaded version) hold one copy while any of them lives."""
        with _SHARED_LOCK:
            model = _SHARED.get(sha256)
            if model is None:
                model = cls.load(path)
                _SHARED[sha256] = model
            return model

    @classmethod
    def load(cls, path: Path) -> GraphoneModel:
        try:
            with np.load(path, allow_pickle=False) as data:
                found = int(data["format"][0]) if "format" in data else None
                if found not in READABLE_FORMATS:
                    raise GraphoneError(
                        f"{path} is not a graphone model of format {' or '.join(map(str, READABLE_FORMATS))}"
                    )
                tokens = [str(t) for t in data["tokens"].tolist()]
                strip = str(data["strip"][0])
                base = len(tokens) + 1
                levels = Trie.levels_of(read_format_1(data), base, tokens) if found == 1 else read_format_2(data, base)
            return cls(tokens, levels, strip)
        except GraphoneError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise GraphoneError(f"cannot read the graphone model {path}: {exc}") from None
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise GraphoneError(f"cannot read the graphone model {path}: {exc}") from None

    # ------------------------------------------------------------------ scoring
    def _walk(self, history: int, length: int, token: int) -> tuple[float, int, int]:
        """(log P(token | history), the history after token) for the history n-gram ``history`` of ``length``
        tokens. The probability backs off along the history's suffixes, adding their back-off weights, to the
        first (suffix, token) n-gram the model has; that n-gram is also the longest suffix of history + token the
        model has, so it is the next history, or (when it has ``order`` tokens) its own longest suffix is."""
        slots, keys, mask, shift, base = self._slots, self._keys, self._mask, self._shift, self._base
        backoff = 0.0
        while length:
            key = history * base + token
            slot = ((key * HASH_MULTIPLIER) & MASK64) >> shift
            while (found := slots[slot]) and keys[found] != key:  # linear probing; 0 is an empty slot
                slot = (slot + 1) & mask
            if found:
                if length + 1 < self.order:
                    return self._lp[found] + backoff, found, length + 1
                after = self._suffix[found]
                return self._lp[found] + backoff, after, self._level[after]
            backoff += self._bo[history]
            history = self._suffix[history]
            length = self._level[history]
        # the unigrams are the tokens: n-gram i is token i
        return (self._lp[token] + backoff, token, 1) if self.order > 1 else (self._lp[token] + backoff, 0, 0)

    def _log_p(self, history: int, length: int, token: int) -> float:
        """log P(token | history), not cached (the end token, once per word and hypothesis)."""
        return self._walk(history, length, token)[0]

    def _step(self, history: int, length: int, token: int) -> tuple[float, int, int]:
        key = (history, length, token)
        step = self._steps.get(key)
        if step is None:
            step = self._walk(history, length, token)
            if len(self._steps) >= CACHE_LIMIT:
                self._steps.clear()
            self._steps[key] = step
        return step

    def score(self, source: Sequence[str], target: Sequence[str], beam: int = 8) -> float | None:
        """Natural-log joint probability of the best graphone segmentation of (source, target), ``None`` when
        no segmentation uses only known graphones. ``target`` as the model outputs it (normalised here)."""
        return self.score_many(source, [target], beam)[0]

    def score_many(self, source: Sequence[str], targets: Sequence[Sequence[str]], beam: int = 8) -> list[float | None]:
        """:meth:`score` of every target for one source, sharing the work of common prefixes.

        A lattice cell (source position, target prefix) holds the best ``beam`` n-gram histories of the paths that
        reach it; it depends on the prefix only, so the targets' prefix tree is searched once (targets that are
        equal after normalisation, e.g. differing only in stress, cost nothing extra).
        """
        normalised = [tuple(normalise(t, self._pattern)) for t in targets]
        n_src = len(source)
        if n_src == 0:
            return [None] * len(targets)
        # the prefix tree: node 0 is the empty prefix; children[node] maps a token to the next node
        children: list[dict[str, int]] = [{}]
        end_of: dict[tuple[str, ...], int] = {}
        for target in dict.fromkeys(normalised):
            node = 0
            for text in target:
                child = children[node].get(text)
                if child is None:
                    child = len(children)
                    children.append({})
                    children[node][text] = child
                node = child
            end_of[target] = node
        # the target chunks a graphone can take from a node: (next node, text); 0 to MAX_TARGET_CHUNK tokens
        chunks: list[list[tuple[int, str]]] = []
        for node in range(len(children)):
            out = [(node, EMPTY)]
            frontier = [(node, "")]
            for _ in range(MAX_TARGET_CHUNK):
                frontier = [
                    (kid, f"{text}{SEQ_SEP}{tok}" if text else tok)
                    for parent, text in frontier
                    for tok, kid in children[parent].items()
                ]
                out.extend(frontier)
            chunks.append(out)
        ids, steps = self._ids, self._steps
        cells: dict[tuple[int, int], dict[tuple[int, int], float]] = {(0, 0): {(self._bos, 1): 0.0}}
        for i in range(n_src):
            src_chunks = [
                (a, SEQ_SEP.join(source[i : i + a]) + SIDE_SEP) for a in range(1, min(MAX_SOURCE_CHUNK, n_src - i) + 1)
            ]
            for node in range(len(children)):
                cell = cells.pop((i, node), None)
                if not cell:
                    continue
                items = sorted(cell.items(), key=lambda kv: -kv[1])[:beam] if len(cell) > beam else list(cell.items())
                for a, src_chunk in src_chunks:
                    for nxt_node, tgt_chunk in chunks[node]:
                        token = ids.get(src_chunk + tgt_chunk)
                        if token is None:
                            continue
                        nxt = cells.setdefault((i + a, nxt_node), {})
                        for state, value in items:
                            step = steps.get((state[0], state[1], token)) or self._step(state[0], state[1], token)
                            total = value + step[0]
                            after = (step[1], step[2])
                            if total > nxt.get(after, -math.inf):
                                nxt[after] = total
        scores: dict[tuple[str, ...], float | None] = {}
        for target, node in end_of.items():
            final = cells.get((n_src, node))
            scores[target] = (
                max(value + self._log_p(h, n, self._eos) for (h, n), value in final.items()) if final else None
            )
        return [scores[t] for t in normalised]


def read_format_1(data: Any) -> list[NGrams]:
    orders = []
    k = 1
    while f"ids{k}" in data:
        orders.append(
            NGrams(
                data[f"ids{k}"].reshape(-1, k),
                data[f"log_prob{k}"].astype(np.float32),
                data[f"backoff{k}"].astype(np.float32),
            )
        )
        k += 1
    return orders


def read_format_2(data: Any, base: int) -> list[Level]:
    none = np.zeros(base - 1, dtype=np.int64)
    levels = [Level(none, np.arange(1, base, dtype=np.int64), data["log_prob1"], data["backoff1"])]
    k = 2
    while f"token{k}" in data:
        levels.append(
            Level(
                np.cumsum(data[f"prefix{k}"], dtype=np.int64),
                data[f"token{k}"].astype(np.int64),
                data[f"log_prob_book{k}"][data[f"log_prob_code{k}"]],
                data[f"backoff_book{k}"][data[f"backoff_code{k}"]],
            )
        )
        k += 1
    return levels
