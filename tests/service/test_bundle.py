"""Bundle loading and text <-> job conversion on the tiny exported model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.engine.beam import Hypothesis, SearchOptions
from service.runtime.bundle import Bundle, SourceError
from service.runtime.manifest import BundleError
from service.text import UNK_ID


def test_unknown_tokens_are_replaced_by_the_most_attended_source_token(tiny_bundle: Path) -> None:
    bundle = Bundle(tiny_bundle)
    a = bundle.tgt_tok.vocab.id("a")
    attention = np.array([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]], dtype=np.float32)
    hyp = Hypothesis(tokens=(UNK_ID, a), score=-1.0, log_prob=-1.0, attention=attention)
    source = ["q", "z", "b"]
    assert bundle.output(hyp, source, replace_unknowns=True).tokens == ["z", "a"]
    assert bundle.output(hyp, source, replace_unknowns=False).tokens == ["<unk>", "a"]


def test_sources_are_bounded(tiny_bundle: Path) -> None:
    bundle = Bundle(tiny_bundle)
    with pytest.raises(SourceError, match="empty"):
        bundle.make_job("", SearchOptions(), 10)
    with pytest.raises(SourceError, match="has 11 tokens, more than the limit of 10"):
        bundle.make_job("a" * 11, SearchOptions(), 10)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "encoder.onnx").write_bytes((d / "encoder.onnx").read_bytes()[:-10]),
            "encoder.onnx is corrupted",
        ),
        (lambda d: (d / "src_vocab.txt").unlink(), "src_vocab.txt is missing"),
        (lambda d: (d / "manifest.json").write_text("[]"), "JSON object"),
        (
            lambda d: (d / "manifest.json").write_text(
                (d / "manifest.json").read_text().replace('"format_version": 1', '"format_version": 9')
            ),
            "format_version 9",
        ),
    ],
)
def test_damaged_bundles_are_refused_with_a_reason(tiny_bundle: Path, tmp_path: Path, damage, message: str) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    damage(copy)
    with pytest.raises(BundleError, match=message):
        Bundle(copy)


def test_graph_io_must_match_the_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["graphs"]["decoder_step"]["outputs"][0]["name"] = "logits"
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="decoder_step graph outputs do not match the manifest"):
        Bundle(copy)


def test_cuda_falls_back_to_cpu_with_a_warning(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is present here")
    caplog.set_level("WARNING", logger="service.runtime.ort")
    bundle = Bundle(tiny_bundle, device="cuda")
    assert bundle.runtime.device == "cpu"
    assert any("no CUDAExecutionProvider" in r.getMessage() for r in caplog.records)


def test_a_manifest_without_the_feed_width_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["architecture"]["dec_hidden"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="lacks a positive integer feed_size or dec_hidden"):
        Bundle(copy, verify=False)
