"""A graphone rescorer in a bundle: the n-gram copied in, its weights tuned on the dev split, both recorded.

The bundle's beam search runs on every dev source keeping all its finished hypotheses; each is scored by the
graphone model once; a grid over (weight, length_weight) picks the pair under which the most dev sources get an
exact-match best hypothesis (with stress removed when the run selected on a ``nostress_`` metric). The same
searches are then re-ranked through :meth:`Bundle.outputs` of the bundle as written (manifest and n-gram read back,
the path the server takes), which must reproduce the tuned figure.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from export.decoding import decode_in_order
from export.onnx_export import ExportError
from service.engine.batch import Job
from service.engine.beam import SearchOptions
from service.runtime.bundle import Bundle
from service.runtime.graphone import GraphoneError, GraphoneModel
from service.runtime.manifest import Manifest, RescoringSpec, read_manifest, sha256_file, write_manifest
from training.data import Example
from training.evaluate import evaluate_hypotheses, strip_stress

log = logging.getLogger(__name__)

GRAPHONE_FILE = "graphone.npz"
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0)
LENGTH_WEIGHTS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
FLOOR = -100.0  # graphone log-probability of a pair the model cannot segment (acronyms, unseen letter chunks)
VITERBI_BEAM = 8


def load_graphone(path: Path) -> GraphoneModel:
    try:
        return GraphoneModel.load(path)
    except GraphoneError as exc:
        raise ExportError(str(exc)) from None


def _matches(tokens: Sequence[str], accepted: set[tuple[str, ...]], stress: bool) -> bool:
    return tuple(tokens if stress else strip_stress(tokens)) in accepted


def _accepted(refs: Sequence[Sequence[str]], stress: bool) -> set[tuple[str, ...]]:
    """The tokenized references as exact matching compares them."""
    return {tuple(r if stress else strip_stress(r)) for r in refs}


def tune(
    bundle: Bundle,
    model: GraphoneModel,
    examples: Sequence[Example],
    jobs: Sequence[Job],
    stress: bool,
    progress: bool = False,
) -> dict[str, Any]:
    """The grid search over the finished searches ``jobs`` of ``examples`` (in order); returns the chosen weights
    and the dev figures before and after."""
    width = max([1, *(len(j.search.finished) for j in jobs)])
    n = len(examples)
    base = np.full((n, width), -np.inf)
    graph = np.zeros((n, width))
    length = np.zeros((n, width))
    right = np.zeros((n, width), dtype=bool)
    tokens: list[list[list[str]]] = []
    log_probs: list[list[float]] = []
    refs = [[bundle.tgt_tok.tokenize(r) for r in ex.refs] for ex in examples]
    unsegmented = 0
    for i, (ex, job) in enumerate(
        tqdm(
            list(zip(examples, jobs, strict=True)), desc="rescoring: graphone scores", unit="word", disable=not progress
        )
    ):
        src = bundle.source_tokens(ex.src)
        outs = [bundle.output(h, src, False) for h in job.search.finished]
        accepted = _accepted(refs[i], stress)
        tokens.append([o.tokens for o in outs])
        log_probs.append([o.log_prob for o in outs])
        values = model.score_many(src, [o.tokens for o in outs], VITERBI_BEAM)
        for k, (o, value) in enumerate(zip(outs, values, strict=True)):
            unsegmented += value is None
            base[i, k] = o.score
            graph[i, k] = FLOOR if value is None else value
            length[i, k] = len(o.tokens) + 1
            right[i, k] = _matches(o.tokens, accepted, stress)
    rows = np.arange(n)

    def picks(weight: float, length_weight: float) -> np.ndarray[Any, Any]:
        total = np.where(np.isfinite(base), base + weight * graph + length_weight * length, -np.inf)
        return np.asarray(total.argmax(axis=1))  # first maximum: ties keep finishing order

    grid = {(w, lw): int(right[rows, picks(w, lw)].sum()) for w in WEIGHTS for lw in LENGTH_WEIGHTS}
    best = max(grid.values())
    # among equally good pairs, the smallest change to the model's ranking
    weight, length_weight = min((k for k, v in grid.items() if v == best), key=lambda k: (k[0], abs(k[1])))

    def figures(choice: np.ndarray[Any, Any]) -> dict[str, float]:
        hyps = [tokens[i][c] if tokens[i] else [] for i, c in enumerate(choice)]
        lps = [log_probs[i][c] if log_probs[i] else -math.inf for i, c in enumerate(choice)]
        return evaluate_hypotheses(hyps, lps, refs)

    return {
        "weight": weight,
        "length_weight": length_weight,
        "before": figures(picks(0.0, 0.0)),
        "after": figures(picks(weight, length_weight)),
        "hypotheses": int(np.isfinite(base).sum()),
        "unsegmented": unsegmented,
    }


def add_rescoring(
    directory: Path,
    manifest: Manifest,
    graphone: Path,
    examples: Sequence[Example],
    beam: int,
    max_len: int,
    select_on: str,
    progress: bool = False,
) -> Manifest:
    """Copy ``graphone`` into the bundle at ``directory``, tune its weights on ``examples``, check the served
    path reproduces the tuned dev figure; returns the updated (written) manifest."""
    model = load_graphone(graphone)
    stress = not select_on.startswith("nostress")
    metric = "wer" if stress else "nostress_wer"
    bundle = Bundle(directory)
    options = SearchOptions(beam_size=beam, n_best=beam, max_len=max_len)
    jobs = [bundle.make_job(ex.src, options, max_source_length=10_000, tag=i) for i, ex in enumerate(examples)]
    jobs = decode_in_order(bundle, jobs, progress, "rescoring: decode dev")
    tuned = tune(bundle, model, examples, jobs, stress, progress)
    if tuned["unsegmented"] > tuned["hypotheses"] / 2:
        log.warning(
            "rescoring: the graphone model cannot segment %d of %d dev hypotheses; was it built from this model's "
            "training split and tokenizers (seqserve graphone CHECKPOINT)?",
            tuned["unsegmented"],
            tuned["hypotheses"],
        )
    shutil.copy2(graphone, directory / GRAPHONE_FILE)
    spec = RescoringSpec(GRAPHONE_FILE, model.order, tuned["weight"], tuned["length_weight"], FLOOR, VITERBI_BEAM)
    record = spec.to_dict() | {
        "model": "graphone (joint-sequence) n-gram, modified Kneser-Ney; seqserve graphone",
        "source_sha256": sha256_file(graphone),
        "target_strip": model.strip,
        "ngrams": model.size,
        "tuning": {
            "split": "dev",
            "examples": len(examples),
            "beam": beam,
            "metric": metric,
            "hypotheses": tuned["hypotheses"],
            "unsegmented": tuned["unsegmented"],
            "weights": list(WEIGHTS),
            "length_weights": list(LENGTH_WEIGHTS),
            "before": tuned["before"],
            "after": tuned["after"],
        },
    }
    files = dict(manifest.files) | {GRAPHONE_FILE: sha256_file(directory / GRAPHONE_FILE)}
    updated = replace(manifest, files=files, rescoring=record)
    write_manifest(directory, updated)
    served = Bundle(directory)  # verifies the sha256 and loads the rescorer as the server does
    hits = 0
    for ex, job in zip(examples, jobs, strict=True):  # the same searches, re-ranked the way the server does it
        outs = served.outputs(job, served.source_tokens(ex.src))
        hits += bool(outs) and _matches(
            outs[0].tokens, _accepted([served.tgt_tok.tokenize(x) for x in ex.refs], stress), stress
        )
    served_wer = 1 - hits / max(len(examples), 1)
    if abs(served_wer - tuned["after"][metric]) > 1e-9:
        raise ExportError(
            f"rescoring: the served path gives dev {metric} {served_wer:.4%}, the tuning {tuned['after'][metric]:.4%}"
        )
    log.info(
        "rescoring: weight %g, length weight %g: dev %s %.2f%% -> %.2f%% (beam %d, %d words)",
        spec.weight,
        spec.length_weight,
        metric,
        100 * tuned["before"][metric],
        100 * tuned["after"][metric],
        beam,
        len(examples),
    )
    return read_manifest(directory)
