"""``seqserve recover``: a training checkpoint from an fp32 bundle, the inverse of export.

A bundle holds its weights only as the initializers of its two ONNX graphs. The exporter lays every parameter out
there by a permutation: LSTM / GRU gates reordered, weight matrices transposed, biases concatenated, nothing
computed from two parameters. So a model of the bundle's architecture is exported twice with random weights: every
parameter element then carries a unique pair of values (a 64-bit mark), each initializer element's mark names the
parameter element it is a copy of, and the bundle's value at the same place is that element's weight. Initializer
elements alike in both exports are constants and must equal the bundle's. Graphs the exporter did not lay out this
way are refused with the reason, as are int8 bundles (rounded weights) and ensembles. The recovered model is
exported once more and must give the bundle's initializers bit for bit; only then is the checkpoint returned.

What for: fine-tuning a shipped model on one's own lexicon (``train.init_from``), ensembling it
(``seqserve eval/export A.pt B.pt``), distilling from it, or re-exporting it (another opset, int8) when only the
bundle was kept.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from export.onnx_export import ExportError, export_graphs
from export.pipeline import optimize_graphs
from service.runtime.manifest import BundleError, Manifest, read_manifest, sha256_file, verify_files
from service.text import SPECIALS, Tokenizer
from training.config import Config, ConfigError, ModelConfig, TrainConfig, config_from_dict
from training.data import make_batch
from training.model import Seq2Seq
from training.train import CHECKPOINT_FORMAT

GRAPHS = ("encoder.onnx", "decoder_step.onnx")
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def config_from_manifest(manifest: Manifest) -> Config:
    """The training configuration the bundle records: architecture, tokenizer kinds, length limits, the dataset."""
    arch = manifest.architecture
    if "ensemble" in arch:
        raise ExportError(
            f"{manifest.name}/{manifest.version} is an ensemble of {len(arch['ensemble'])} models; recover works on"
            " a bundle of one model (export each member's checkpoint on its own)"
        )
    data = manifest.training.get("data", {})
    dataset = data.get("name", "cmudict")
    tokenizers = manifest.tokenizers
    raw = {
        "model": {k: v for k, v in arch.items() if k in MODEL_FIELDS},
        "data": {
            "dataset": dataset if dataset in ("cmudict", "reverse", "tsv") else "tsv",
            "train": data.get("file", "") if dataset == "tsv" else "",
            "src_tokenizer": tokenizers["src"].kind,
            "tgt_tokenizer": tokenizers["tgt"].kind,
            "shared_vocab": tokenizers["src"].vocab == tokenizers["tgt"].vocab,
            "max_src_len": manifest.max_source_length,
            "max_tgt_len": manifest.default_max_length,
        },
        "train": {"select_on": manifest.training.get("best_dev", {}).get("metric", TrainConfig.select_on)},
    }
    try:
        return config_from_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise ExportError(f"the manifest's architecture is not one this version can build: {exc}") from None


def _sample_batch(src_tok: Tokenizer, tgt_tok: Tokenizer, copy: bool) -> Any:
    """Eight inputs of distinct lengths from the vocabularies (the exporter traces with them; values do not
    matter)."""
    rng = random.Random(0)

    def text(tok: Tokenizer, n: int) -> str:
        words = tok.vocab.itos[len(SPECIALS) :] or ["a"]
        return tok.detokenize([rng.choice(words) for _ in range(n)])

    return make_batch([(text(src_tok, n), text(tgt_tok, 3)) for n in range(9, 1, -1)], src_tok, tgt_tok, copy)


def _initializers(directory: Path) -> list[tuple[str, np.ndarray[Any, Any]]]:
    out = []
    for name in GRAPHS:
        graph = onnx.load(str(directory / name)).graph
        out += [(f"{name}:{t.name}", numpy_helper.to_array(t)) for t in graph.initializer]
    return out


def _shapes(inits: list[tuple[str, np.ndarray[Any, Any]]]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(name.split(":")[0], a.shape, str(a.dtype)) for name, a in inits]


def _keys(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Each element's two float32 marks as one 64-bit key (bit patterns: a copy keeps them exactly)."""
    high = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    low = np.ascontiguousarray(b, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return np.asarray((high << np.uint64(32)) | low).reshape(-1)


def _exported(model: Seq2Seq, batch: Any, flat: torch.Tensor, optimize: bool) -> list[tuple[str, np.ndarray[Any, Any]]]:
    """The initializers of ``model`` exported with its parameters, in order, set from ``flat``."""
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()
    with tempfile.TemporaryDirectory(prefix="seqserve-recover-") as tmp:
        export_graphs(model, batch.src, batch.src_len, Path(tmp))
        if optimize:
            optimize_graphs(Path(tmp))
        return _initializers(Path(tmp))


def recover(directory: Path) -> dict[str, Any]:
    """The checkpoint of the fp32 bundle at ``directory`` (verified by re-export; see the module's doc)."""
    try:
        manifest = read_manifest(directory)
        verify_files(directory, manifest)
    except BundleError as exc:
        raise ExportError(f"{directory}: {exc}") from None
    if manifest.quantization:
        raise ExportError(
            f"{directory} is a quantized bundle ({manifest.quantization.get('method', 'int8')}): its weights were"
            " rounded to 8 bits and cannot be recovered; recover from the fp32 bundle it was made from"
        )
    cfg = config_from_manifest(manifest)
    src_tok = Tokenizer.load(manifest.tokenizers["src"], directory)
    tgt_tok = Tokenizer.load(manifest.tokenizers["tgt"], directory)
    model = Seq2Seq(cfg.model, len(src_tok.vocab), len(tgt_tok.vocab))
    model.eval()
    built = model.architecture()
    if any(built.get(k) != v for k, v in manifest.architecture.items()):
        raise ExportError("the manifest's architecture does not describe a model this version builds the same way")
    batch = _sample_batch(src_tok, tgt_tok, model.uses_copy)
    target = _initializers(directory)
    total = sum(p.numel() for p in model.parameters())
    marks = [torch.randn(total, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    for optimize in (False, True):  # a bundle exported with --optimize has onnxruntime's layout
        passes = [_exported(model, batch, mark, optimize) for mark in marks]
        if _shapes(passes[0]) == _shapes(target):
            break
    else:
        raise ExportError(
            f"{directory}: its graphs' weights are not laid out as this version exports the manifest's architecture"
            " (another exporter, or edited graphs); cannot recover"
        )
    keys = _keys(marks[0].numpy(), marks[1].numpy())
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    if (ranked[1:] == ranked[:-1]).any():  # two random 64-bit marks alike: never seen; refuse rather than guess
        raise ExportError("recover: two parameters drew the same marks; run it again")
    flat = torch.zeros(total, dtype=torch.float32)
    assigned = torch.zeros(total, dtype=torch.bool)
    for i, (name, graph_value) in enumerate(target):
        a, b, value = (x.reshape(-1) for x in (passes[0][i][1], passes[1][i][1], graph_value))
        key = _keys(a, b)
        at = np.minimum(np.searchsorted(ranked, key), total - 1)
        found = ranked[at] == key
        constant = ~found & (a == b) & (value == a)  # the same in every export: not a parameter's
        if not (found | constant).all():
            raise ExportError(f"{name}: a weight the exporter computes from several parameters; cannot recover")
        index = torch.from_numpy(order[at[found]])
        got = torch.from_numpy(np.ascontiguousarray(value[found], dtype=np.float32))
        if (assigned[index] & (flat[index] != got)).any():
            raise ExportError(f"{name}: one weight has two different values in the graphs; cannot recover")
        flat[index] = got
        assigned[index] = True
    missing = ~assigned
    offset = 0
    for pname, p in model.named_parameters():
        if missing[offset : offset + p.numel()].any():
            raise ExportError(f"parameter {pname} does not appear in the graphs; cannot recover it")
        offset += p.numel()
    check = _exported(model, batch, flat, optimize)
    for (name, a), (_, b) in zip(check, target, strict=True):
        if not np.array_equal(a, b):
            raise ExportError(f"{name}: the recovered model re-exports to other weights; cannot recover")
    training = manifest.training
    best = training.get("best_dev", {})
    files = {s.model: (directory / s.model).read_bytes() for s in manifest.tokenizers.values() if s.model}
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "state": {
            "step": int(training.get("step", 0)),
            "epoch": int(training.get("epoch", 0)),
            "best_score": float(best.get("value", math.inf)),
            "select_on": cfg.train.select_on,
        },
        "vocabs": {"src": src_tok.vocab.itos, "tgt": tgt_tok.vocab.itos},
        "tokenizers": {"src": src_tok.spec.to_dict(), "tgt": tgt_tok.spec.to_dict()},
        "files": files,
        "data": training.get("data", {}),
        "recovered_from": {
            "bundle": f"{manifest.name}/{manifest.version}",
            "manifest_sha256": sha256_file(directory / "manifest.json"),
            "checkpoint": training.get("checkpoint", ""),
        },
    }
