"""Export every architecture; torch vs onnxruntime n-best equality; refusal on failed parity; int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.onnx_export import ExportError
from export.pipeline import GRAPH_RTOL, GRAPH_TOLERANCE, ExportOptions, bound_ratio, export_checkpoint
from export.recover import recover
from service.runtime.bundle import Bundle
from service.runtime.manifest import read_manifest, sha256_file, verify_files
from tests.training.test_training import ARCHITECTURES, TINY
from training.config import load_config
from training.train import Trainer, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def trained_checkpoint(tmp_path: Path, extra: list[str], steps: int = 40) -> Path:
    t = Trainer(load_config(None, [*TINY, *extra, f"train.max_steps={steps}", "train.epochs=5"]), tmp_path / "run")
    t.run(resume=False, progress=False)
    return tmp_path / "run" / "last.pt"


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_exports_with_nbest_parity(name: str, tmp_path: Path) -> None:
    ckpt = trained_checkpoint(tmp_path, ARCHITECTURES[name])
    target = tmp_path / "repo" / name / "1"
    manifest = export_checkpoint(ckpt, target, ExportOptions(name=name, version=1, parity_limit=40, progress=False))
    parity = manifest.parity
    assert parity["nbest_identical"] == parity["examples"] == 40  # every n-best list identical, beam 5
    assert max(parity["graph_worst_ratio"].values()) <= 1.0  # every output within its allclose bound
    verify_files(target, read_manifest(target))
    bundle = Bundle(target)  # the server's own checks pass
    step_inputs = {t.name for t in manifest.graphs["decoder_step"].inputs}
    assert ("src_ext" in step_inputs) == ("copy" in name)
    assert ("step" in step_inputs) == (name == "lstm-local-m")
    if name == "lstm-local-p":
        assert "position" in {t.name for t in manifest.graphs["decoder_step"].outputs}
    assert bundle.manifest.architecture["cell"] in ("lstm", "gru", "rnn")
    ops = {n.op_type for n in onnx.load(str(target / "encoder.onnx")).graph.node}
    assert {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[bundle.manifest.architecture["cell"]] in ops
    # and `seqserve recover` gives back exactly the weights that went in
    original, recovered = load_checkpoint(ckpt), recover(target)
    assert recovered["model"].keys() == original["model"].keys()
    for key, tensor in original["model"].items():
        assert torch.equal(recovered["model"][key], tensor), (name, key)
    assert recovered["config"]["model"] == original["config"]["model"]
    assert recovered["vocabs"] == original["vocabs"] and recovered["tokenizers"] == original["tokenizers"]


def test_graph_parity_bound_is_tight_near_certainty_and_relative_in_the_tail() -> None:
    def ratio(torch_value: float, onnx_value: float) -> float:
        return bound_ratio(np.array([torch_value]), np.array([onnx_value]), GRAPH_TOLERANCE, GRAPH_RTOL)

    # a sharp model's tail: log p = -10 (p ~ 5e-5) differing by 5e-4 between fp32 kernels is float noise
    assert ratio(-10.0, -10.0005) <= 1.0
    # near the top of the distribution, where the search decides, the bound stays ~1e-4
    assert ratio(-0.01, -0.0103) > 1.0
    assert ratio(-0.01, -0.01005) <= 1.0
    assert ratio(-30.0, -30.01) > 1.0  # relative, not unlimited: 1e-2 at -30 exceeds 1e-4 + 3e-3
    assert bound_ratio(np.zeros(3), np.zeros(3), 0.0, 0.0) == 0.0  # equal values pass even a zero bound
    assert bound_ratio(np.zeros(3), np.full(3, 1e-9), 0.0, 0.0) == float("inf")


def test_failed_parity_refuses_the_export_and_publishes_nothing(tmp_path: Path) -> None:
    ckpt = trained_checkpoint(tmp_path, [], steps=10)
    target = tmp_path / "repo" / "m" / "1"
    with pytest.raises(ExportError, match="graph parity failed"):
        export_checkpoint(
            ckpt, target, ExportOptions(name="m", version=1, parity_limit=10, tolerance=0.0, rtol=0.0, progress=False)
        )
    assert not target.exists()
    assert not list((tmp_path / "repo" / "m").iterdir())  # the temporary directory is gone too


def test_export_onto_an_existing_version_is_refused_before_any_work(tmp_path: Path) -> None:
    target = tmp_path / "repo" / "m" / "1"
    target.mkdir(parents=True)
    (target / "manifest.json").write_text("{}")
    # refused up front (the checkpoint is not even read), not after minutes of parity checks
    with pytest.raises(ExportError, match="exists; pass --overwrite to replace it"):
        export_checkpoint(tmp_path / "missing.pt", target, ExportOptions(name="m", version=1, progress=False))
    assert (target / "manifest.json").read_text() == "{}"


def test_int8_bundle_records_quality_and_speed(tmp_path: Path) -> None:
    ckpt = trained_checkpoint(tmp_path, [], steps=60)
    target = tmp_path / "repo" / "m" / "2"
    manifest = export_checkpoint(
        ckpt, target, ExportOptions(name="m", version=2, quantize="int8", parity_limit=30, progress=False)
    )
    q = manifest.quantization
    assert set(q["delta"]) >= {"wer", "per", "nostress_wer", "nostress_per"}
    assert 0.0 < q["int8"]["confidence"] <= 1.0 and 0.0 <= q["int8"]["ece"] <= 1.0
    assert q["speedup"] > 0 and q["size_bytes"]["int8"] < q["size_bytes"]["fp32"]
    assert manifest.parity["enforced"] is False
    ops = {n.op_type for n in onnx.load(str(target / "decoder_step.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLSTM", "DynamicQuantizeLinear"}
    Bundle(target)


def test_shipped_g2p_bundle_carries_parity_and_hashes() -> None:
    bundle_dir = ROOT / "models" / "g2p-en" / "2"
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    assert manifest.parity["nbest_identical_rate"] >= 0.999
    assert manifest.parity["examples"] >= 6000  # the whole CMUdict dev split
    for name, digest in manifest.files.items():
        assert sha256_file(bundle_dir / name) == digest
    for graph in manifest.graphs.values():
        onnx.checker.check_model(str(bundle_dir / graph.file), full_check=True)
    total = sum(p.stat().st_size for p in (ROOT / "models").rglob("*") if p.is_file())
    assert total < 30 * 1024 * 1024
    assert json.loads((bundle_dir / "manifest.json").read_text())["training"]["data"]["name"] == "cmudict"
    for shipped in (bundle_dir, ROOT / "models" / "g2p-en-int8" / "2"):  # both re-rank with a graphone n-gram
        tuning = read_manifest(shipped).rescoring["tuning"]
        assert tuning["examples"] >= 6000 and tuning["metric"] == "nostress_wer"
        assert tuning["after"]["nostress_wer"] < tuning["before"]["nostress_wer"]
        assert Bundle(shipped).rescorer is not None


def test_offline_optimised_bundle_keeps_parity(tmp_path: Path) -> None:
    ckpt = trained_checkpoint(tmp_path, [], steps=20)
    target = tmp_path / "repo" / "m" / "1"
    manifest = export_checkpoint(
        ckpt, target, ExportOptions(name="m", version=1, optimize=True, parity_limit=30, progress=False)
    )
    assert manifest.parity["nbest_identical"] == 30
    verify_files(target, read_manifest(target))  # hashes are of the optimised graphs
    Bundle(target)
    recovered = recover(target)  # onnxruntime's layout of the weights is recognised too
    for key, tensor in load_checkpoint(ckpt)["model"].items():
        assert torch.equal(recovered["model"][key], tensor), key


def test_ensemble_of_different_architectures_exports_with_nbest_parity(tmp_path: Path) -> None:
    """Two checkpoints (LSTM general attention; GRU, concat attention, reversed source) -> one bundle."""
    a = trained_checkpoint(tmp_path / "a", [], steps=40)
    b = trained_checkpoint(tmp_path / "b", ["model.cell=gru", "model.attention=concat", "model.reverse_source=true"])
    target = tmp_path / "repo" / "ens" / "1"
    manifest = export_checkpoint([a, b], target, ExportOptions(name="ens", version=1, parity_limit=40, progress=False))
    assert manifest.parity["nbest_identical"] == 40  # the served search equals the torch ensemble's beam search
    assert manifest.state_names == ("m0_h", "m0_c", "m1_h")
    assert [m["cell"] for m in manifest.architecture["ensemble"]] == ["lstm", "gru"]
    assert [m["checkpoint"] for m in manifest.training["ensemble"]] == ["last.pt", "last.pt"]
    assert manifest.summary().startswith("ensemble of 2 (prob average): bi-lstm 2x16 -> 2x32")
    bundle = Bundle(target)
    assert bundle.runtime.initial_feed(3).shape == (3, 64)  # both members' input-feeding vectors


def test_ensemble_of_copy_and_plain_models_is_refused(tmp_path: Path) -> None:
    a = trained_checkpoint(tmp_path / "a", ["data.shared_vocab=true"], steps=5)
    b = trained_checkpoint(tmp_path / "b", ["model.copy=true", "data.shared_vocab=true"], steps=5)
    target = tmp_path / "repo" / "ens" / "1"
    with pytest.raises(ExportError, match="copy models can only be combined with copy models"):
        export_checkpoint([a, b], target, ExportOptions(name="ens", version=1, parity_limit=5, progress=False))
    assert not target.exists()
