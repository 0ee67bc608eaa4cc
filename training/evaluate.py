"""Word and phoneme error rates against one or more references."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

_STRESS = re.compile(r"\d+$")


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def strip_stress(tokens: Sequence[str]) -> list[str]:
    """``AH0`` -> ``AH``: stress digits at the end of a phoneme removed."""
    return [_STRESS.sub("", t) for t in tokens]


@dataclass(frozen=True)
class Scores:
    words: int
    wer: float  # share of sources whose hypothesis matches no reference
    per: float  # edit distance to the closest reference / length of those references

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}wer": self.wer, f"{prefix}per": self.per, f"{prefix}words": self.words}


def score(hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], stress: bool = True) -> Scores:
    """hyps[i] is a token list; refs[i] a list of accepted token lists."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} reference sets")
    errors = 0
    dist_total = 0
    len_total = 0
    for hyp, ref_set in zip(hyps, refs, strict=True):
        h = list(hyp) if stress else strip_stress(hyp)
        candidates = [list(r) if stress else strip_stress(r) for r in ref_set]
        best_dist, best_len = min((edit_distance(h, r), len(r)) for r in candidates)
        errors += best_dist > 0
        dist_total += best_dist
        len_total += best_len
    n = max(len(hyps), 1)
    return Scores(words=len(hyps), wer=errors / n, per=dist_total / max(len_total, 1))


def calibration(
    log_probs: Sequence[float], hyps: Sequence[Sequence[str]], refs: Sequence[Sequence[Sequence[str]]], bins: int = 10
) -> dict[str, float]:
    """How well the best hypothesis's probability exp(log_prob) predicts that it matches a reference exactly (with
    stress: the probability is the model's for that exact sequence). ``confidence``: the mean probability;
    ``ece``: the expected calibration error over ``bins`` equal-width probability bins (Guo et al. 2017), the
    words-weighted mean of |mean probability - share right| per bin: 0 for a perfectly calibrated model."""
    if not len(log_probs) == len(hyps) == len(refs):
        raise ValueError(f"{len(log_probs)} scores, {len(hyps)} hypotheses, {len(refs)} reference sets")
    count, prob_sum, right = [0] * bins, [0.0] * bins, [0] * bins
    for log_prob, hyp, ref_set in zip(log_probs, hyps, refs, strict=True):
        p = math.exp(log_prob) if log_prob > -math.inf else 0.0
        k = min(int(p * bins), bins - 1)
        count[k] += 1
        prob_sum[k] += p
        right[k] += any(list(hyp) == list(r) for r in ref_set)
    n = max(len(hyps), 1)
    ece = sum(abs(prob_sum[k] - right[k]) for k in range(bins)) / n
    return {"confidence": sum(prob_sum) / n, "ece": ece}


def evaluate_hypotheses(
    hyps: Sequence[Sequence[str]],
    log_probs: Sequence[float],
    refs: Sequence[Sequence[Sequence[str]]],
    prefix: str = "",
) -> dict[str, float]:
    """Everything ``seqserve eval`` reports about best hypotheses, as one flat dict: ``wer``, ``per``, ``words``,
    the same with stress removed (``nostress_...``), ``confidence`` and ``ece``; each key after ``prefix``."""
    return (
        score(hyps, refs, stress=True).as_dict(prefix)
        | score(hyps, refs, stress=False).as_dict(f"{prefix}nostress_")
        | {f"{prefix}{k}": v for k, v in calibration(log_probs, hyps, refs).items()}
    )
