"""Temperature scaling (Guo et al. 2017): calibrated hypothesis probabilities from a trained model.

A model whose probabilities are too sharp says 0.99 for words it gets wrong one time in five (distilled students
are like that: they were trained on a teacher's outputs, which they can reproduce almost surely). One scalar T,
fitted on the dev split after training, divides the output logits: softmax(logits / T). The most probable next
token never changes, so greedy outputs stay the same; beam search can rank a few hypotheses differently; the
probabilities the API returns (``log_prob``) mean what they say. T is chosen to minimise the dev split's
teacher-forced negative log-likelihood per target token (every reference of every word), and stored as
``model.temperature`` in a weights-only copy of the checkpoint, which export writes into the decoder graph.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from training.average import slim_checkpoint
from training.config import ConfigError
from training.data import Batch, batches, training_pairs
from training.model import Seq2Seq

SEARCH_RANGE = (0.05, 20.0)  # temperatures considered
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def mean_nll(model: Seq2Seq, data: list[Batch], temperature: float) -> float:
    """Teacher-forced negative log-likelihood per target token with the logits divided by ``temperature`` (the model
    keeps that temperature afterwards)."""
    from training.train import mean_token_nll

    model.cfg = dataclasses.replace(model.cfg, temperature=temperature)
    return mean_token_nll(model, data)


def fit_temperature(model: Seq2Seq, data: list[Batch], tol: float = 1e-3, progress: bool = False) -> float:
    """Golden-section search over log T in :data:`SEARCH_RANGE` for the lowest dev NLL (unimodal in practice)."""
    lo, hi = math.log(SEARCH_RANGE[0]), math.log(SEARCH_RANGE[1])
    steps = math.ceil(math.log(tol / (hi - lo)) / math.log(GOLDEN))
    a, b = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    fa, fb = mean_nll(model, data, math.exp(a)), mean_nll(model, data, math.exp(b))
    for _ in tqdm(range(steps), desc="calibrate", unit="fit", disable=not progress):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - GOLDEN * (hi - lo)
            fa = mean_nll(model, data, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + GOLDEN * (hi - lo)
            fb = mean_nll(model, data, math.exp(b))
    return math.exp((lo + hi) / 2.0)


def calibrate_file(path: Path, out: Path, batch_size: int = 256, progress: bool = False) -> dict[str, Any]:
    """Fit T for the checkpoint at ``path`` on its data set's dev split and write the calibrated copy to ``out``.
    Returns what the checkpoint records under ``state["calibration"]``. ValueError (ConfigError, DataError) with a
    one-line reason."""
    from training.train import load_checkpoint, load_datasets, model_from_checkpoint, save_checkpoint

    if out.resolve() == path.resolve():
        raise ConfigError(f"--out must differ from the checkpoint it calibrates ({path})")
    ckpt = load_checkpoint(path)
    model, cfg, src_tok, tgt_tok = model_from_checkpoint(ckpt)
    dev = load_datasets(cfg.data, cfg.train.seed).dev
    pairs = training_pairs(dev)
    data = list(batches(pairs, batch_size, src_tok, tgt_tok, cfg.model.copy, seed=0, shuffle=False))
    if not data:
        raise ConfigError(f"{path}: its data set has an empty dev split; nothing to calibrate on")
    before_t = cfg.model.temperature
    before = mean_nll(model, data, before_t)
    fitted = fit_temperature(model, data, progress=progress)
    after = mean_nll(model, data, fitted)
    if after > before:  # the search found no better temperature than the one the checkpoint has
        fitted, after = before_t, before
    record = {
        "temperature": fitted,
        "previous_temperature": before_t,
        "dev_nll": [before, after],
        "dev_words": len(dev),
        "dev_pairs": len(pairs),
        "from": str(path),
    }
    calibrated = slim_checkpoint(ckpt)
    calibrated["config"] = {**ckpt["config"], "model": {**ckpt["config"]["model"], "temperature": fitted}}
    calibrated["state"] = dict(ckpt["state"]) | {"calibration": record}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(calibrated, out)
    return record
