"""``seqserve export``: checkpoint -> verified bundle (graph parity + n-best parity), optionally int8."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from export.decoding import decode_in_order
from export.onnx_export import ExportError, atomic_bundle_dir, graph_spec, make_manifest, publish, write_bundle
from export.rescoring import add_rescoring, load_graphone
from service.engine.batch import decode_all
from service.engine.beam import SearchOptions
from service.runtime.bundle import Bundle
from service.runtime.manifest import Manifest, read_manifest, write_manifest
from service.text import Tokenizer
from training.config import Config
from training.data import Example, make_batch
from training.decode import beam_search
from training.ensemble import load_models
from training.evaluate import evaluate_hypotheses
from training.model import StepModel
from training.train import load_datasets

log = logging.getLogger(__name__)

# Graph parity, per element of every graph output: |torch - onnxruntime| <= GRAPH_TOLERANCE + GRAPH_RTOL * |torch|
# (numpy.allclose's rule). The relative term matters only for a sharp model's large negative log-probabilities, where
# fp32 kernels differ by up to ~2e-4 at log p <= -2 (0.02 % in probability); near log p = 0 the bound stays ~1e-4.
GRAPH_TOLERANCE = 1e-4
GRAPH_RTOL = 1e-4
MIN_AGREEMENT = 0.999  # share of inputs whose n-best token sequences must be identical
PARITY_BEAM = 5


@dataclass(frozen=True)
class ExportOptions:
    name: str
    version: int
    quantize: str = ""  # "" or "int8"
    optimize: bool = False
    parity_limit: int = 0  # 0: every parity example
    beam: int = PARITY_BEAM
    tolerance: float = GRAPH_TOLERANCE
    rtol: float = GRAPH_RTOL
    min_agreement: float = MIN_AGREEMENT
    overwrite: bool = False
    progress: bool = True
    combine: str = "prob"  # ensembles: how the members' distributions combine (training.config.COMBINE)
    graphone: Path | None = None  # a graphone n-gram (seqserve graphone) to rescore the n-best, tuned on dev


def bound_ratio(ref: np.ndarray[Any, Any], got: np.ndarray[Any, Any], tolerance: float, rtol: float) -> float:
    """max |ref - got| / (tolerance + rtol * |ref|) over all elements: parity holds where it is <= 1."""
    diff = np.abs(ref - got)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero bound: any difference is infinitely over it
        ratio = np.where(diff == 0, 0.0, diff / (tolerance + rtol * np.abs(ref)))
    return float(ratio.max(initial=0.0))


@dataclass(frozen=True)
class GraphParity:
    max_abs_diff: dict[str, float]  # per graph output
    worst_ratio: dict[str, float]  # max |diff| / (tolerance + rtol * |torch|); parity holds where all are <= 1

    def failures(self) -> dict[str, float]:
        return {k: self.max_abs_diff[k] for k, r in self.worst_ratio.items() if r > 1.0}


def graph_parity(
    model: StepModel,
    bundle: Bundle,
    examples: Sequence[Example],
    cfg: Config,
    tolerance: float = GRAPH_TOLERANCE,
    rtol: float = GRAPH_RTOL,
    batch_size: int = 128,
    max_batches: int = 4,
) -> GraphParity:
    """Differences per graph output, torch vs onnxruntime, on real inputs (teacher-forced steps)."""
    src_tok, tgt_tok = bundle.src_tok, bundle.tgt_tok
    diffs: dict[str, float] = {}
    ratios: dict[str, float] = {}

    def note(key: str, a: torch.Tensor, b: np.ndarray[Any, Any]) -> None:
        ref = a.detach().numpy()
        diff = np.abs(ref - b)
        diffs[key] = max(diffs.get(key, 0.0), float(diff.max(initial=0.0)))
        ratios[key] = max(ratios.get(key, 0.0), bound_ratio(ref, b, tolerance, rtol))

    pairs = [(ex.src, ex.refs[0]) for ex in examples[: batch_size * max_batches]]
    for start in range(0, len(pairs), batch_size):
        batch = make_batch(pairs[start : start + batch_size], src_tok, tgt_tok, model.uses_copy)
        with torch.no_grad():
            memory, states = model.encode(batch.src, batch.src_len)
            o_memory, o_states = bundle.runtime.encode(batch.src.numpy(), batch.src_len.numpy())
            note("encoder.memory", memory, o_memory)
            for name, a, b in zip(model.state_names, states, o_states, strict=True):
                note(f"encoder.state_{name}", a, b)
            n = batch.src.size(0)
            feed = torch.zeros(n, model.feed_size)
            o_states_t = [s.copy() for s in o_states]
            o_feed = feed.numpy().copy()
            mem_np = memory.numpy()
            ext = batch.src_ext
            for t in range(batch.tgt_in.size(1)):
                tokens = batch.tgt_in[:, t]
                step = torch.full((n,), t, dtype=torch.long)
                lp, states, feed, attn, _ = model.step(tokens, states, feed, memory, batch.src_len, step, ext)
                out = bundle.runtime.step(
                    tokens.numpy(),
                    [torch.from_numpy(s).numpy() for s in o_states_t],
                    o_feed,
                    mem_np,
                    batch.src_len.numpy(),
                    step.numpy(),
                    None if ext is None else ext.numpy(),
                )
                note("decoder_step.log_probs", lp, out.log_probs)
                note("decoder_step.attention", attn, out.attention)
                note("decoder_step.feed_out", feed, out.feed)
                for name, a, b in zip(model.state_names, states, out.states, strict=True):
                    note(f"decoder_step.state_{name}_out", a, b)
                # keep both sides on the same inputs: continue from torch's values
                o_states_t = [s.numpy().copy() for s in states]
                o_feed = feed.numpy().copy()
    return GraphParity(diffs, ratios)


def nbest_parity(
    model: StepModel,
    bundle: Bundle,
    examples: Sequence[Example],
    cfg: Config,
    beam: int,
    progress: bool,
    batch_size: int = 256,
) -> tuple[int, list[dict[str, Any]]]:
    """Torch reference beam search vs the serving beam search on onnxruntime: identical n-best token lists?"""
    options = SearchOptions(beam_size=beam, n_best=beam, max_len=cfg.data.max_tgt_len)
    mismatches: list[dict[str, Any]] = []
    agree = 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="n-best parity", unit="batch", disable=not progress):
        chunk = examples[start : start + batch_size]
        batch = make_batch([(ex.src, "") for ex in chunk], bundle.src_tok, bundle.tgt_tok, model.uses_copy)
        ref = beam_search(
            model, batch.src, batch.src_len, beam=beam, n_best=beam, max_len=cfg.data.max_tgt_len, src_ext=batch.src_ext
        )
        jobs = [bundle.make_job(ex.src, options, max_source_length=10_000, tag=i) for i, ex in enumerate(chunk)]
        served = {j.tag: j for j in decode_all(bundle.runtime, jobs, copy=bundle.copy, pad_id=bundle.pad)}
        for i, ex in enumerate(chunk):
            want = [h.tokens for h in ref[i]]
            got = [h.tokens for h in served[i].search.results()]
            if want == got:
                agree += 1
            else:
                mismatches.append(
                    {"source": ex.src, "torch": [list(t) for t in want[:2]], "served": [list(t) for t in got[:2]]}
                )
    return agree, mismatches


def evaluate_bundle(
    bundle: Bundle,
    examples: Sequence[Example],
    beam: int,
    max_len: int,
    progress: bool = False,
    desc: str = "decode",
    rescore: bool = True,
) -> tuple[dict[str, float], float]:
    """WER / PER of a bundle through the serving beam search (and its rescorer, if any, unless ``rescore`` is
    false), and the decode wall time in seconds."""
    options = SearchOptions(beam_size=beam, n_best=1, max_len=max_len)
    jobs = [bundle.make_job(ex.src, options, max_source_length=10_000, tag=i) for i, ex in enumerate(examples)]
    start = time.perf_counter()
    done = decode_in_order(bundle, jobs, progress, desc)
    seconds = time.perf_counter() - start
    hyps, log_probs = [], []
    for ex, job in zip(examples, done, strict=True):
        outs = bundle.outputs(job, bundle.source_tokens(ex.src), rescore=rescore)
        hyps.append(outs[0].tokens if outs else [])
        log_probs.append(outs[0].log_prob if outs else -math.inf)
    refs = [[bundle.tgt_tok.tokenize(r) for r in ex.refs] for ex in examples]
    return evaluate_hypotheses(hyps, log_probs, refs), seconds


def quantize_bundle(src_dir: Path, dst_dir: Path) -> None:
    """onnxruntime dynamic int8 quantization of both graphs (MatMul / LSTM / GRU weights)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in ("encoder.onnx", "decoder_step.onnx"):
        quantize_dynamic(
            str(src_dir / name),
            str(dst_dir / name),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "LSTM", "GRU", "Gather"],
        )


def optimize_graphs(directory: Path) -> None:
    """Offline onnxruntime graph optimisation (extended level: portable across CPUs)."""
    for name in ("encoder.onnx", "decoder_step.onnx"):
        path = directory / name
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        tmp = directory / f"{name}.opt"
        opts.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        tmp.replace(path)


@dataclass(frozen=True)
class Loaded:
    model: StepModel
    cfg: Config  # the first checkpoint's (data settings, seed)
    src_tok: Tokenizer
    tgt_tok: Tokenizer
    files: dict[str, bytes]  # tokenizer model files carried by the checkpoint
    training_info: dict[str, Any]


def load(checkpoints: Sequence[Path], combine: str = "prob") -> Loaded:
    """One checkpoint -> its model; several -> their ensemble (members must tokenize identically)."""
    try:
        model, cfg, src_tok, tgt_tok, ckpts = load_models(checkpoints, combine)
    except ValueError as exc:  # unreadable checkpoints; models that cannot form an ensemble
        raise ExportError(str(exc)) from exc

    def info(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
        return {
            "checkpoint": path.name,
            "step": ckpt["state"]["step"],
            "epoch": ckpt["state"]["epoch"],
            "best_dev": {
                "metric": ckpt["config"]["train"].get("select_on", "wer"),
                "value": ckpt["state"]["best_score"],
            },
            "data": ckpt.get("data", {}),
        }

    members = [info(p, c) for p, c in zip(checkpoints, ckpts, strict=True)]
    training_info = members[0] if len(members) == 1 else {"ensemble": members, "combine": combine}
    return Loaded(model, cfg, src_tok, tgt_tok, ckpts[0].get("files", {}), training_info)


def export_checkpoint(checkpoints: Path | Sequence[Path], target: Path, opts: ExportOptions) -> Manifest:
    """A checkpoint (or several: an ensemble) -> a verified bundle at ``target``."""
    paths = [checkpoints] if isinstance(checkpoints, Path) else list(checkpoints)
    if target.exists() and not opts.overwrite:  # checked again when publishing; this spares minutes of parity work
        raise ExportError(f"{target} exists; pass --overwrite to replace it")
    if opts.graphone is not None:
        load_graphone(opts.graphone)  # a bad file fails now, not after minutes of parity checks
    loaded = load(paths, opts.combine)
    model, cfg, src_tok, tgt_tok = loaded.model, loaded.cfg, loaded.src_tok, loaded.tgt_tok
    training_info = loaded.training_info
    dev = load_datasets(cfg.data, cfg.train.seed).dev
    examples = dev
    if opts.parity_limit:
        examples = examples[: opts.parity_limit]
    if not examples:
        raise ExportError("no parity examples: the checkpoint's dev data is empty")
    sample = make_batch([(ex.src, ex.refs[0]) for ex in examples[:8]], src_tok, tgt_tok, model.uses_copy)
    tmp, target = atomic_bundle_dir(target)
    try:
        fp32_dir = tmp if not opts.quantize else tmp / "fp32"
        manifest = write_bundle(
            model,
            cfg,
            src_tok,
            tgt_tok,
            loaded.files,
            sample.src,
            sample.src_len,
            fp32_dir,
            opts.name,
            opts.version,
            training_info,
        )
        if opts.optimize:
            optimize_graphs(fp32_dir)
            manifest = make_manifest(
                model,
                cfg,
                src_tok,
                tgt_tok,
                read_manifest(fp32_dir).graphs,
                fp32_dir,
                opts.name,
                opts.version,
                training_info,
            )
        bundle = Bundle(fp32_dir)
        graphs = graph_parity(model, bundle, examples, cfg, opts.tolerance, opts.rtol)
        worst = max(graphs.max_abs_diff.values())
        agree, mismatches = nbest_parity(model, bundle, examples, cfg, opts.beam, opts.progress)
        rate = agree / len(examples)
        parity = {
            "examples": len(examples),
            "beam": opts.beam,
            "n_best_compared": opts.beam,
            "graph_max_abs_diff": graphs.max_abs_diff,
            "graph_tolerance": opts.tolerance,
            "graph_rtol": opts.rtol,
            "graph_worst_ratio": graphs.worst_ratio,
            "nbest_identical": agree,
            "nbest_identical_rate": rate,
            "required_rate": opts.min_agreement,
            "mismatches": mismatches[:50],
            "mismatch_count": len(mismatches),
        }
        log.info(
            "parity: worst graph diff %.2e, %.2f of its bound (%.0e + %.0e * |torch|); n-best identical on %d/%d"
            " (%.3f%%)",
            worst,
            max(graphs.worst_ratio.values()),
            opts.tolerance,
            opts.rtol,
            agree,
            len(examples),
            100 * rate,
        )
        bad = graphs.failures()
        if bad:
            raise ExportError(
                f"graph parity failed: max abs difference {bad} exceeds {opts.tolerance:g} + {opts.rtol:g} * |torch|"
            )
        if rate < opts.min_agreement:
            shown = "; ".join(m["source"] for m in mismatches[:5])
            raise ExportError(
                f"n-best parity failed: identical on {agree}/{len(examples)} inputs "
                f"({100 * rate:.2f}% < {100 * opts.min_agreement:.1f}%); first mismatches: {shown}"
            )
        manifest = _with(manifest, fp32_dir, parity=parity, onnxruntime_version=ort.__version__)
        if opts.quantize:
            manifest = _quantized(model, cfg, src_tok, tgt_tok, fp32_dir, tmp, examples, opts, training_info, manifest)
            shutil.rmtree(fp32_dir)
        if opts.graphone is not None:  # tuned on the whole dev split, whatever --parity-limit says
            manifest = add_rescoring(
                tmp, manifest, opts.graphone, dev, opts.beam, cfg.data.max_tgt_len, cfg.train.select_on, opts.progress
            )
        publish(tmp, target, opts.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _with(manifest: Manifest, directory: Path, **changes: Any) -> Manifest:
    from dataclasses import replace

    updated = replace(manifest, **changes)
    write_manifest(directory, updated)
    return updated


def _quantized(
    model: StepModel,
    cfg: Config,
    src_tok: Any,
    tgt_tok: Any,
    fp32_dir: Path,
    out_dir: Path,
    examples: Sequence[Example],
    opts: ExportOptions,
    training_info: dict[str, Any],
    fp32_manifest: Manifest,
) -> Manifest:
    for name in fp32_manifest.files:
        if not name.endswith(".onnx"):
            shutil.copy2(fp32_dir / name, out_dir / name)
    quantize_bundle(fp32_dir, out_dir)
    graphs = {
        "encoder": graph_spec(out_dir / "encoder.onnx"),
        "decoder_step": graph_spec(out_dir / "decoder_step.onnx"),
    }
    manifest = make_manifest(
        model,
        cfg,
        src_tok,
        tgt_tok,
        graphs,
        out_dir,
        opts.name,
        opts.version,
        training_info,
        ort_version=ort.__version__,
    )
    fp32 = Bundle(fp32_dir)
    int8 = Bundle(out_dir)
    diffs = graph_parity(model, int8, examples, cfg).max_abs_diff
    agree, mismatches = nbest_parity(model, int8, examples, cfg, opts.beam, opts.progress)
    max_len = cfg.data.max_tgt_len
    # side by side, alternating, on the same inputs: quality and decode speed
    fp32_scores, fp32_s = evaluate_bundle(fp32, examples, opts.beam, max_len, opts.progress, "fp32 eval")
    int8_scores, int8_s = evaluate_bundle(int8, examples, opts.beam, max_len, opts.progress, "int8 eval")
    _, fp32_s2 = evaluate_bundle(fp32, examples, opts.beam, max_len, opts.progress, "fp32 eval")
    _, int8_s2 = evaluate_bundle(int8, examples, opts.beam, max_len, opts.progress, "int8 eval")
    quantization = {
        "method": "onnxruntime.quantization.quantize_dynamic, QInt8 weights (MatMul, LSTM, GRU, Gather)",
        "examples": len(examples),
        "beam": opts.beam,
        "fp32": fp32_scores,
        "int8": int8_scores,
        "delta": {k: int8_scores[k] - fp32_scores[k] for k in fp32_scores if k.endswith(("wer", "per"))},
        "decode_seconds": {
            "fp32": [round(fp32_s, 3), round(fp32_s2, 3)],
            "int8": [round(int8_s, 3), round(int8_s2, 3)],
        },
        "speedup": round(float(np.median([fp32_s, fp32_s2]) / np.median([int8_s, int8_s2])), 3),
        "size_bytes": {
            "fp32": sum((fp32_dir / f).stat().st_size for f in ("encoder.onnx", "decoder_step.onnx")),
            "int8": sum((out_dir / f).stat().st_size for f in ("encoder.onnx", "decoder_step.onnx")),
        },
    }
    parity = {
        "examples": len(examples),
        "beam": opts.beam,
        "graph_max_abs_diff": diffs,
        "nbest_identical": agree,
        "nbest_identical_rate": agree / len(examples),
        "mismatch_count": len(mismatches),
        "mismatches": mismatches[:20],
        "enforced": False,
        "note": "int8 is judged by its WER/PER change (quantization), not by exact parity",
    }
    return _with(manifest, out_dir, parity=parity, quantization=quantization)
