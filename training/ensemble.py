"""Ensembles: several trained models decoding as one.

An :class:`Ensemble` has the interface of :class:`~training.model.Seq2Seq` that decoding and
export use (:class:`~training.model.StepModel`), so ``seqserve eval`` and ``seqserve export``
take it like a single model and the exported bundle needs nothing new from the server:

- the encoder runs every member's encoder and concatenates their memories along the feature
  axis (members read the same source tokens, so the source axis agrees);
- the decoder step splits memory and the input-feeding vector back per member, runs every
  member's step on its own recurrent states (named ``m0_h``, ``m0_c``, ``m1_h``, ...) and
  combines the next-token distributions: ``prob`` averages probabilities (log of the mean),
  ``logprob`` averages log-probabilities (a normalised product of experts);
- the returned attention is the members' mean (alignments, unk replacement).

Members must share their tokenizers and vocabularies exactly; their architectures may differ
(cells, sizes, attention, source reversal). Copy models combine only with copy models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from service.text import Tokenizer
from training.config import COMBINE, Config
from training.model import Seq2Seq, StepModel


class EnsembleError(ValueError):
    """The models cannot be combined (different vocabularies, copy and non-copy members...)."""


class Ensemble(nn.Module):
    def __init__(self, members: Sequence[Seq2Seq], combine: str = "prob") -> None:
        super().__init__()
        if len(members) < 2:
            raise EnsembleError("an ensemble needs at least two models")
        if combine not in COMBINE:
            raise EnsembleError(f"combine must be one of {COMBINE}, got {combine!r}")
        if len({m.uses_copy for m in members}) > 1:
            raise EnsembleError("copy models can only be combined with copy models (their outputs differ in size)")
        if len({(m.src_vocab, m.tgt_vocab) for m in members}) > 1:
            raise EnsembleError("the models have different vocabulary sizes")
        self.members = nn.ModuleList(members)
        self.combine = combine
        self._members: list[Seq2Seq] = list(members)
        self._memory_sizes = [m.cfg.memory_size for m in members]
        self._feed_sizes = [m.feed_size for m in members]
        self._state_counts = [len(m.state_names) for m in members]
        self._state_names = tuple(f"m{i}_{name}" for i, m in enumerate(members) for name in m.state_names)

    @property
    def state_names(self) -> tuple[str, ...]:
        return self._state_names

    @property
    def feed_size(self) -> int:
        return sum(self._feed_sizes)

    @property
    def uses_copy(self) -> bool:
        return self._members[0].uses_copy

    @property
    def emits_position(self) -> bool:
        return False  # members' local-p positions differ; the server does not use them

    def architecture(self) -> dict[str, Any]:
        """The manifest's description: the members, how they combine, and what the runtime reads."""
        return {
            "ensemble": [m.architecture() for m in self._members],
            "combine": self.combine,
            "feed_size": self.feed_size,  # the runtime sizes the initial input-feeding vector from it
            "memory_size": sum(self._memory_sizes),
            "copy": self.uses_copy,
        }

    def _split_states(self, states: Sequence[Tensor]) -> list[list[Tensor]]:
        out, start = [], 0
        for count in self._state_counts:
            out.append(list(states[start : start + count]))
            start += count
        return out

    def encode(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, list[Tensor]]:
        memories, states = [], []
        for member in self._members:
            memory, member_states = member.encode(src, src_len)
            memories.append(memory)
            states.extend(member_states)
        return torch.cat(memories, dim=-1), states

    def step(
        self,
        tokens: Tensor,
        states: list[Tensor],
        feed: Tensor,
        memory: Tensor,
        src_len: Tensor,
        step: Tensor,
        src_ext: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
        memories = memory.split(self._memory_sizes, dim=-1)
        feeds = feed.split(self._feed_sizes, dim=-1)
        log_probs, new_states, new_feeds, weights = [], [], [], []
        for member, m_memory, m_feed, m_states in zip(
            self._members, memories, feeds, self._split_states(states), strict=True
        ):
            lp, st, fd, w, _ = member.step(tokens, m_states, m_feed, m_memory, src_len, step, src_ext)
            log_probs.append(lp)
            new_states.extend(st)
            new_feeds.append(fd)
            weights.append(w)
        stacked = torch.stack(log_probs)  # [members, N, V']
        if self.combine == "prob":
            combined = torch.logsumexp(stacked, dim=0) - math.log(len(log_probs))
        else:
            combined = torch.log_softmax(stacked.mean(dim=0), dim=-1)
        attention = torch.stack(weights).mean(dim=0)
        position = feed.new_zeros(step.shape)  # not emitted (see emits_position)
        return combined, new_states, torch.cat(new_feeds, dim=-1), attention, position


def tokenization_difference(ckpt: dict[str, Any], other: dict[str, Any]) -> str:
    """What makes two checkpoints (their ``tokenizers``, ``vocabs`` and ``files``) tokenize differently, e.g.
    "target tokenizer or vocabulary" or "source SentencePiece model"; "" when they tokenize identically."""
    for side in ("src", "tgt"):
        name = "source" if side == "src" else "target"
        if ckpt["tokenizers"][side] != other["tokenizers"][side] or ckpt["vocabs"][side] != other["vocabs"][side]:
            return f"{name} tokenizer or vocabulary"
        model_file = ckpt["tokenizers"][side].get("model")
        if model_file and ckpt["files"].get(model_file) != other["files"].get(model_file):
            return f"{name} SentencePiece model"
    return ""


def check_compatible(checkpoints: Sequence[dict[str, Any]], paths: Sequence[str]) -> None:
    """Members must tokenize identically: the same tokenizer specs, vocabularies and SentencePiece models."""
    first = checkpoints[0]
    for path, ckpt in zip(paths[1:], checkpoints[1:], strict=True):
        difference = tokenization_difference(ckpt, first)
        if difference:
            raise EnsembleError(f"{path} has a different {difference} than {paths[0]}")
        for key in ("max_src_len", "max_tgt_len"):
            if ckpt["config"]["data"][key] != first["config"]["data"][key]:
                raise EnsembleError(f"{path} was trained with a different data.{key} than {paths[0]}")


def load_models(
    paths: Sequence[str | Path], combine: str = "prob"
) -> tuple[StepModel, Config, Tokenizer, Tokenizer, list[dict[str, Any]]]:
    """One checkpoint -> its model; several -> their ensemble. Also the first checkpoint's config (data
    settings), the shared tokenizers and the loaded checkpoints. ValueError (EnsembleError for models that
    cannot be combined) with a one-line reason."""
    from training.train import load_checkpoint, model_from_checkpoint

    checkpoints = [load_checkpoint(p) for p in paths]
    if len(checkpoints) > 1:
        check_compatible(checkpoints, [str(p) for p in paths])
    loaded = [model_from_checkpoint(c) for c in checkpoints]
    model, cfg, src_tok, tgt_tok = loaded[0]
    if len(loaded) == 1:
        return model, cfg, src_tok, tgt_tok, checkpoints
    ensemble = Ensemble([m for m, _, _, _ in loaded], combine)
    ensemble.eval()
    return ensemble, cfg, src_tok, tgt_tok, checkpoints
