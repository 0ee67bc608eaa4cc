"""Checkpoint averaging: the element-wise mean of several checkpoints' weights as one checkpoint.

Averaging the weights of the last few epochs of one run (``train.keep_checkpoints`` keeps them as
``epoch-NNN.pt``) usually decodes a little better than any one of them, at no inference cost, unlike
an ensemble (which runs every member). The checkpoints must come from the same architecture with the
same tokenizers and vocabularies -- in practice, from one run. The result is a weights-only
checkpoint that ``seqserve eval`` and ``seqserve export`` take like ``best.pt``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.config import ModelConfig


class AverageError(ValueError):
    """The checkpoints cannot be averaged (different architectures or vocabularies)."""


def slim_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without the optimizer state and random generators: weights, config, tokenizers."""
    return {k: v for k, v in ckpt.items() if k not in ("optimizer", "rng")}


def model_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's model config with defaults filled in (older checkpoints lack newer keys)."""
    return dataclasses.asdict(ModelConfig(**ckpt["config"]["model"]))


def average_checkpoints(checkpoints: Sequence[dict[str, Any]], paths: Sequence[str]) -> dict[str, Any]:
    """The first checkpoint with its weights replaced by the mean of all checkpoints' weights."""
    if not checkpoints:
        raise AverageError("give at least one checkpoint")
    first = checkpoints[0]
    for path, ckpt in zip(paths[1:], checkpoints[1:], strict=True):
        mine, theirs = model_settings(ckpt), model_settings(first)
        if mine != theirs:  # (a calibrated copy differs from its run's epochs in temperature only)
            differing = ", ".join(sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)))
            raise AverageError(f"{path} has a different model architecture than {paths[0]} ({differing})")
        if ckpt["vocabs"] != first["vocabs"] or ckpt["tokenizers"] != first["tokenizers"]:
            raise AverageError(f"{path} has different tokenizers or vocabularies than {paths[0]}")
        if ckpt["files"] != first["files"]:
            raise AverageError(f"{path} has different SentencePiece models than {paths[0]}")
        if ckpt["model"].keys() != first["model"].keys():
            raise AverageError(f"{path} holds different parameters than {paths[0]}")
    averaged: dict[str, torch.Tensor] = {}
    for name, tensor in first["model"].items():
        values = [c["model"][name] for c in checkpoints]
        if tensor.is_floating_point():
            total = torch.stack([v.to(torch.float64) for v in values]).mean(dim=0)
            averaged[name] = total.to(tensor.dtype)
        elif all(torch.equal(v, tensor) for v in values):
            averaged[name] = tensor.clone()
        else:
            raise AverageError(f"integer tensor {name!r} differs between the checkpoints; cannot average it")
    out = slim_checkpoint(first)
    out["model"] = averaged
    out["state"] = dict(first["state"]) | {
        "averaged_from": [str(p) for p in paths],
        "averaged_steps": [c["state"].get("step") for c in checkpoints],
    }
    return out


def average_files(paths: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Average checkpoint files into ``out`` (written atomically). ValueError with a one-line reason."""
    from training.train import load_checkpoint, save_checkpoint

    checkpoints = [load_checkpoint(p) for p in paths]
    averaged = average_checkpoints(checkpoints, [str(p) for p in paths])
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(averaged, target)
    return averaged
