"""Tokenizers and vocabularies shared by training, export and serving (no torch here).

Special tokens have fixed ids in every vocabulary: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3.
A vocabulary file holds one token per line; the line number is the id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NEVER_GENERATED = [PAD_ID, BOS_ID]  # output tokens no search may choose, however a model weighs them
TOKENIZER_KINDS = ("char", "word", "sentencepiece")


class TokenizerError(ValueError):
    """A tokenizer could not be built or loaded."""


class Vocab:
    def __init__(self, tokens: Sequence[str]) -> None:
        if tuple(tokens[:4]) != SPECIALS:
            raise TokenizerError(f"a vocabulary must start with {SPECIALS}")
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise TokenizerError("vocabulary has duplicate tokens")

    def __len__(self) -> int:
        return len(self.itos)

    def id(self, token: str) -> int:
        return self.stoi.get(token, UNK_ID)

    @classmethod
    def build(cls, sequences: Iterable[Sequence[str]], min_freq: int = 1) -> Vocab:
        counts: Counter[str] = Counter()
        for seq in sequences:
            counts.update(seq)
        kept = sorted(
            (t for t, c in counts.items() if c >= min_freq and t not in SPECIALS), key=lambda t: (-counts[t], t)
        )
        return cls([*SPECIALS, *kept])

    def save(self, path: Path) -> None:
        for token in self.itos:
            if "\n" in token:
                raise TokenizerError(f"token {token!r} contains a newline")
        path.write_text("\n".join(self.itos) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocab:
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            raise TokenizerError(f"{path.name}: vocabulary file must end with a newline")
        return cls(text[:-1].split("\n"))


@dataclass(frozen=True)
class TokenizerSpec:
    """How one side (source or target) turns text into tokens; stored in the manifest."""

    kind: str
    vocab: str  # file name inside the bundle
    lowercase: bool = False
    model: str | None = None  # sentencepiece model file inside the bundle

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": self.vocab, "lowercase": self.lowercase, "model": self.model}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TokenizerSpec:
        kind = raw.get("kind")
        if kind not in TOKENIZER_KINDS:
            raise TokenizerError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
        vocab = raw.get("vocab")
        if not isinstance(vocab, str):
            raise TokenizerError("tokenizer needs a 'vocab' file name")
        model = raw.get("model")
        if kind == "sentencepiece" and not isinstance(model, str):
            raise TokenizerError("a sentencepiece tokenizer needs a 'model' file name")
        return cls(kind=kind, vocab=vocab, lowercase=bool(raw.get("lowercase", False)), model=model)


class Tokenizer:
    """Text <-> token strings <-> ids for one side of a model."""

    def __init__(self, spec: TokenizerSpec, vocab: Vocab, sp_model: Any = None) -> None:
        self.spec = spec
        self.vocab = vocab
        self._sp = sp_model

    @classmethod
    def load(cls, spec: TokenizerSpec, directory: Path) -> Tokenizer:
        vocab = Vocab.load(directory / spec.vocab)
        sp_model = None
        if spec.kind == "sentencepiece":
            assert spec.model is not None
            sp_model = load_sentencepiece(directory / spec.model)
        return cls(spec, vocab, sp_model)

    def tokenize(self, text: str) -> list[str]:
        if self.spec.lowercase:
            text = text.lower()
        if self.spec.kind == "char":
            return list(text)
        if self.spec.kind == "word":
            return text.split()
        return list(self._sp.encode(text, out_type=str))

    def detokenize(self, tokens: Sequence[str]) -> str:
        if self.spec.kind == "char":
            return "".join(tokens)
        if self.spec.kind == "word":
            return " ".join(tokens)
        return str(self._sp.decode_pieces(list(tokens)))

    def encode(self, text: str) -> list[int]:
        return [self.vocab.id(t) for t in self.tokenize(text)]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.vocab.itos[i] if 0 <= i < len(self.vocab) else UNK for i in ids]


def load_sentencepiece(path: Path) -> Any:
    try:
        import sentencepiece
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TokenizerError("this model uses SentencePiece: install the 'sentencepiece' package") from exc
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def extend_source(src_tokens: Sequence[str], tgt_vocab: Vocab) -> tuple[list[int], list[str]]:
    """Copy-mechanism ids of the source tokens in the target's extended vocabulary.

    A source token known to the target vocabulary keeps its target id; the k-th distinct
    unknown one gets id ``len(tgt_vocab) + k``. Returns the ids and the unknown tokens in order.
    """
    oov: list[str] = []
    ids: list[int] = []
    for token in src_tokens:
        known = tgt_vocab.stoi.get(token)
        if known is not None and known >= len(SPECIALS):
            ids.append(known)
            continue
        if token not in oov:
            oov.append(token)
        ids.append(len(tgt_vocab) + oov.index(token))
    return ids, oov


def ids_to_tokens(ids: Sequence[int], tgt_vocab: Vocab, oov: Sequence[str]) -> list[str]:
    """Target token strings; copy models' extended ids (>= len(vocab)) map back to the source's unknown tokens."""
    size = len(tgt_vocab)
    out = []
    for i in ids:
        if i < size:
            out.append(tgt_vocab.itos[i])
        else:
            out.append(oov[i - size] if i - size < len(oov) else UNK)
    return out
