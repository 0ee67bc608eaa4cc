"""Word and phoneme error rates against one or more references."""

from __future__ import annotations

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
