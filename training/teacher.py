"""Word-level knowledge distillation: a teacher's next-token distributions as soft targets.

With ``train.teacher`` set (one checkpoint, or several separated by commas whose probabilities are averaged like
an ensemble's), the student's loss per target token is

    (1 - w) · NLL(reference token) + w · CE(teacher's top-K distribution, student's distribution)

with w = ``train.kd_weight`` and K = ``train.kd_top_k`` (Hinton et al. 2015; "word-level" distillation in Kim &
Rush 2016, who combine it with training on the teacher's outputs: ``data.distill``). The teacher reads each
training pair once, teacher-forced on that pair's target, the first time the pair is in a batch; its K most
probable next tokens at every position (renormalised to sum to 1) are kept in memory, so later epochs cost what
plain training costs. The teacher runs in eval mode, so its targets are the same after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.config import ConfigError
from training.data import Batch, file_sha256
from training.ensemble import tokenization_difference
from training.model import Seq2Seq


def teacher_paths(spec: str) -> list[str]:
    """``train.teacher``: checkpoint paths separated by commas."""
    return [p.strip() for p in spec.split(",") if p.strip()]


class Teacher:
    """Soft targets from one or more trained models; rows are cached by training-pair index. ``tokenization`` is the
    student run's (``Trainer.tokenization()``): every teacher must tokenize the same way."""

    def __init__(
        self,
        paths: Sequence[str],
        tokenization: dict[str, Any],
        copy: bool,
        device: torch.device,
        top_k: int,
    ) -> None:
        from training.train import load_checkpoint, model_from_checkpoint

        if not paths:
            raise ConfigError("train.teacher names no checkpoint")
        self.paths = list(paths)
        self.top_k = top_k
        self.members: list[Seq2Seq] = []
        for path in self.paths:
            if not Path(path).is_file():
                raise ConfigError(f"train.teacher: {path} not found")
            try:
                ckpt = load_checkpoint(path)
            except ValueError as exc:
                raise ConfigError(f"train.teacher: {exc}") from exc
            difference = tokenization_difference(ckpt, tokenization)
            if difference:
                raise ConfigError(
                    f"train.teacher: {path} has a different {difference} than this run's data; "
                    "a teacher must be trained on the same data set and tokenizer settings"
                )
            with torch.random.fork_rng(devices=[]):  # building it must not move the student's random stream
                model = model_from_checkpoint(ckpt)[0]
            if model.uses_copy != copy:
                raise ConfigError(
                    f"train.teacher: {path} {'is' if model.uses_copy else 'is not'} a copy model and the student "
                    f"{'is' if copy else 'is not'}; their output vocabularies differ"
                )
            self.members.append(model.to(device).eval())
        self.sha256 = [file_sha256(Path(p)) for p in self.paths]
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}  # pair index -> ids [T, K] int32, probs [T, K] fp16
        self.computed_rows = 0  # rows the teacher has read: each training pair once (tests check it)

    @torch.no_grad()
    def distributions(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Teacher-forced top-K next tokens of a batch: ids [B, T, K] and probabilities [B, T, K] (rows sum to 1)."""
        log_probs = torch.stack(
            [m(batch.src, batch.src_len, batch.tgt_in, batch.src_ext) for m in self.members]
        )  # [members, B, T, V']
        mixed = torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))  # log of the mean probability
        top, ids = mixed.topk(min(self.top_k, mixed.size(-1)), dim=-1)
        return ids, torch.softmax(top, dim=-1)

    def targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Soft targets for a batch from ``batches()`` (it carries pair indices), on the batch's device.
        Padded positions get probability 0."""
        if batch.index is None:
            raise ValueError("soft targets need batches that carry their pair indices")
        rows = batch.index.tolist()
        lengths = (batch.tgt_out != 0).sum(dim=1).tolist()
        if any(i not in self._cache for i in rows):
            ids, probs = self.distributions(batch)
            ids, probs = ids.to("cpu", torch.int32), probs.to("cpu", torch.float16)
            for r, (i, n) in enumerate(zip(rows, lengths, strict=True)):
                if i not in self._cache:
                    self._cache[i] = (ids[r, :n].clone(), probs[r, :n].clone())
                    self.computed_rows += 1
        bsz, t_len = batch.tgt_out.shape
        k = next(iter(self._cache.values()))[0].size(1)
        out_ids = torch.zeros(bsz, t_len, k, dtype=torch.long)
        out_probs = torch.zeros(bsz, t_len, k)
        for r, i in enumerate(rows):
            ids_i, probs_i = self._cache[i]
            out_ids[r, : ids_i.size(0)] = ids_i
            out_probs[r, : probs_i.size(0)] = probs_i.float()
        return out_ids.to(batch.tgt_out.device), out_probs.to(batch.tgt_out.device)
