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
with 10 bits the same as float32.)
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

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


def shared_floats(values: npt.NDArray[np.floating[Any]]) -> list[float]:
    """``values.tolist()`` where equal values are one Python float object: a quantized model's dictionaries then
    hold references to its codebooks' floats instead of one 24-byte object per n-gram."""
    unique, inverse = np.unique(values, return_inverse=True)
    objects = unique.tolist()
    return [objects[i] for i in inverse.ravel().tolist()]


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


class GraphoneModel:
    def __init__(self, tokens: Sequence[str], orders: Sequence[NGrams], strip: str = "") -> None:
        if not orders or BOS not in tokens or EOS not in tokens:
            raise GraphoneError("a graphone model needs unigrams including <s> and </s>")
        self.strip = strip  # removed from every target token before scoring (e.g. "[0-9]": ARPAbet stress)
        self._pattern = target_pattern(strip)
        self.tokens = list(tokens)
        self.order = len(orders)
        self._ids = {tok: i + 1 for i, tok in enumerate(self.tokens)}  # 0 is never a token: keys stay unique
        self._base = len(self.tokens) + 1
        self._pow = [self._base**k for k in range(self.order + 1)]
        # key of (w1 .. wk) = wk + B * w(k-1) + B^2 * w(k-2) ...: the newest token in the lowest digit, so the
        # key of a history's last j tokens is key % B^j. The dictionaries are the model: the arrays are not kept
        # (≈ 19 MB for the shipped 7-gram); save() works from the keys
        self._log_prob: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        for grams in orders:
            key_list = keys_of(grams.ids.astype(np.int64), self._base).tolist()
            self._log_prob.update(zip(key_list, shared_floats(grams.log_prob), strict=True))
            self._backoff.update(
                (k, b) for k, b in zip(key_list, shared_floats(grams.backoff), strict=True) if b != 0.0
            )
        self._bos = self._ids[BOS]
        self._eos = self._ids[EOS]
        self.size = len(self._log_prob)
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
        return cls(tokens, orders, strip)

    def save(self, path: Path) -> None:
        """Write the model as a trie with codebooks (format 2): lossy above the unigrams, ≈ 2.5x smaller
        than float32 arrays. Needs every n-gram's (n-1)-gram prefix in the model, as ARPA files from MITLM,
        KenLM and SRILM have."""
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "format": np.asarray([FORMAT]),
            "tokens": np.asarray(self.tokens, dtype=str),
            "strip": np.asarray([self.strip], dtype=str),
        }
        previous: npt.NDArray[Any] | None = None
        for k, (keys, log_prob, backoff) in enumerate(self._by_order(), 1):
            if k == 1:
                if not np.array_equal(keys, np.arange(1, len(self.tokens) + 1)):
                    raise GraphoneError("the unigrams must be the tokens, in order")
                arrays["log_prob1"], arrays["backoff1"] = log_prob, backoff
            else:
                assert previous is not None
                wanted = keys // self._base  # the (k-1)-gram prefix of each k-gram
                index = np.searchsorted(previous, wanted)
                found = index < len(previous)
                found[found] = previous[index[found]] == wanted[found]
                if not found.all():
                    missing = self._digits(keys[int(np.argmin(found))], k)
                    raise GraphoneError(
                        f"the {k}-gram {' '.join(self.tokens[i - 1] for i in missing)} has no {k - 1}-gram prefix "
                        "in the model; it cannot be stored as a trie"
                    )
                arrays[f"token{k}"] = smallest_uint((keys % self._base).astype(np.int64))
                arrays[f"prefix{k}"] = smallest_uint(np.diff(index, prepend=0))  # non-decreasing: small steps
                arrays[f"log_prob_code{k}"], arrays[f"log_prob_book{k}"] = quantize(log_prob)
                arrays[f"backoff_code{k}"], arrays[f"backoff_book{k}"] = quantize(backoff)
            previous = keys
        with path.open("wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

    def _by_order(self) -> list[tuple[npt.NDArray[Any], npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
        """Per order: the n-grams' keys ascending (for keys of one order, the token ids' lexicographic order),
        their log-probabilities and back-off weights, from the dictionaries."""
        keys = np.asarray(list(self._log_prob), dtype=object)
        log_prob = np.asarray(list(self._log_prob.values()), dtype=np.float32)
        backoff = np.asarray([self._backoff.get(k, 0.0) for k in self._log_prob], dtype=np.float32)
        orders = []
        for k in range(1, self.order + 1):
            # a key of order k has k base-B digits, the first one >= 1
            chosen = np.flatnonzero((keys >= self._pow[k - 1]) & (keys < self._pow[k]))
            chosen = chosen[np.argsort(keys[chosen], kind="stable")]
            order_keys = keys[chosen]
            if self._pow[k] < 2**63:
                order_keys = order_keys.astype(np.int64)
            orders.append((order_keys, log_prob[chosen], backoff[chosen]))
        return orders

    def _digits(self, key: int, k: int) -> list[int]:
        """The k token ids of a key."""
        return [int(key) // self._pow[j] % self._base for j in range(k - 1, -1, -1)]

    def ngrams(self) -> list[NGrams]:
        """The model's n-grams by order (token ids int64 in lexicographic order, values float32)."""
        return [
            NGrams(np.asarray([self._digits(key, k) for key in keys], dtype=np.int64).reshape(-1, k), lp, bo)
            for k, (keys, lp, bo) in enumerate(self._by_order(), 1)
        ]

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
                orders = read_format_1(data) if found == 1 else read_format_2(data, len(tokens))
        except (OSError, ValueError, KeyError, IndexError) as exc:
            if isinstance(exc, GraphoneError):
                raise
            raise GraphoneError(f"cannot read the graphone model {path}: {exc}") from None
        return cls(tokens, orders, strip)

    # ------------------------------------------------------------------ scoring
    def _log_p(self, history: int, length: int, token: int) -> float:
        """log P(token | the last ``length`` tokens packed in ``history``), backing off to shorter contexts."""
        backoff = 0.0
        for k in range(length, -1, -1):
            context = history % self._pow[k]
            value = self._log_prob.get(token + self._base * context)
            if value is not None:
                return value + backoff
            if k:
                backoff += self._backoff.get(context, 0.0)
        return -99.0 * LN10  # a token outside the model (cannot happen for a known graphone)

    def _state(self, history: int, length: int, token: int) -> tuple[int, int]:
        """The history after ``token``: its longest suffix (at most order - 1 tokens) that is a known n-gram."""
        length = min(length + 1, self.order - 1)
        key = (token + self._base * history) % self._pow[length]
        while length > 1 and key not in self._log_prob:
            length -= 1
            key %= self._pow[length]
        return key, length

    def _step(self, history: int, length: int, token: int) -> tuple[float, int, int]:
        key = (history, length, token)
        step = self._steps.get(key)
        if step is None:
            step = (self._log_p(history, length, token), *self._state(history, length, token))
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


def keys_of(ids: npt.NDArray[np.int64], base: int) -> npt.NDArray[Any]:
    """The model's key of every row of token ids (base-B digits, the last token lowest): int64, or Python
    integers (dtype object) where int64 could overflow."""
    wide = base ** ids.shape[1] >= 2**63
    keys: npt.NDArray[Any] = np.zeros(len(ids), dtype=object if wide else np.int64)
    for col in range(ids.shape[1]):
        keys = keys * base + (ids[:, col].astype(object) if wide else ids[:, col])
    return keys


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


def read_format_2(data: Any, n_tokens: int) -> list[NGrams]:
    dtype = np.uint16 if n_tokens < 65536 else np.int32
    ids = cast("npt.NDArray[np.integer[Any]]", np.arange(1, n_tokens + 1, dtype=dtype)[:, None])
    orders = [NGrams(ids, data["log_prob1"].astype(np.float32), data["backoff1"].astype(np.float32))]
    k = 2
    while f"token{k}" in data:
        prefix = np.cumsum(data[f"prefix{k}"], dtype=np.int64)
        ids = np.concatenate([ids[prefix], data[f"token{k}"].astype(dtype).reshape(-1, 1)], axis=1)
        log_prob = data[f"log_prob_book{k}"][data[f"log_prob_code{k}"]].astype(np.float32)
        backoff = data[f"backoff_book{k}"][data[f"backoff_code{k}"]].astype(np.float32)
        orders.append(NGrams(ids, log_prob, backoff))
        k += 1
    return orders
