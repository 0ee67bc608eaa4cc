"""``seqserve recover``: a bundle back to a training checkpoint (what users fine-tune and ensemble from)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from export.onnx_export import ExportError
from export.recover import recover
from service.cli import main
from service.runtime.manifest import read_manifest, write_manifest
from tests.conftest import TINY_MODEL
from training.config import load_config
from training.train import Trainer, load_checkpoint, model_from_checkpoint


def edited_copy(bundle: Path, tmp_path: Path, **changes: Any) -> Path:
    copy = tmp_path / "repo" / "rev" / "1"
    shutil.copytree(bundle, copy)
    write_manifest(copy, dataclasses.replace(read_manifest(copy), **changes))
    return copy


def test_recovered_checkpoint_is_the_exported_one_and_fine_tunes(
    tiny_checkpoint: Path, tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rev-1.pt"
    assert main(["recover", str(tiny_bundle), "--out", str(out)]) == 0
    assert "bit for bit" in capsys.readouterr().out
    original, recovered = load_checkpoint(tiny_checkpoint), load_checkpoint(out)
    for key, tensor in original["model"].items():
        assert torch.equal(recovered["model"][key], tensor), key
    assert recovered["state"]["step"] == original["state"]["step"]
    assert recovered["recovered_from"]["bundle"] == "rev/1"
    model_from_checkpoint(recovered)  # evaluable, exportable, ensemblable like any checkpoint
    # fine-tuning starts from exactly these weights (same vocabularies as a run on the same data)
    (tmp_path / "run").mkdir()
    run = Trainer(load_config(None, [*TINY_MODEL, f"train.init_from={out}"]), tmp_path / "run")
    run.init_weights(out)
    for key, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, original["model"][key]), key


def test_recover_refuses_to_overwrite_and_reports_missing_bundles(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.pt"
    out.write_bytes(b"keep me")
    assert main(["recover", str(tiny_bundle), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["recover", str(tmp_path / "nope"), "--out", str(tmp_path / "y.pt")]) == 2
    assert "not a bundle directory" in capsys.readouterr().err


def test_int8_and_ensemble_bundles_are_refused_with_the_reason(tiny_bundle: Path, tmp_path: Path) -> None:
    int8 = edited_copy(tiny_bundle, tmp_path / "a", quantization={"method": "int8 dynamic quantization"})
    with pytest.raises(ExportError, match="rounded to 8 bits"):
        recover(int8)
    arch = read_manifest(tiny_bundle).architecture
    ensemble = edited_copy(tiny_bundle, tmp_path / "b", architecture={"ensemble": [arch, arch], "combine": "prob"})
    with pytest.raises(ExportError, match="ensemble of 2 models"):
        recover(ensemble)


def test_a_tampered_bundle_is_refused(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "repo" / "rev" / "1"
    shutil.copytree(tiny_bundle, copy)
    with (copy / "decoder_step.onnx").open("ab") as f:
        f.write(b"\0")
    assert main(["recover", str(copy), "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err
    assert "decoder_step.onnx" in err and "sha256" in err
    assert not (tmp_path / "x.pt").exists()


def test_graphs_this_exporter_does_not_write_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """Weights laid out unlike this version's export of the manifest's architecture are not guessed at."""
    import onnx
    from onnx import numpy_helper

    from service.runtime.manifest import sha256_file

    copy = tmp_path / "repo" / "rev" / "1"
    shutil.copytree(tiny_bundle, copy)
    model = onnx.load(str(copy / "encoder.onnx"))
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:-1], init.name))  # one row fewer
    onnx.save(model, str(copy / "encoder.onnx"))
    manifest = read_manifest(copy)
    files = manifest.files | {"encoder.onnx": sha256_file(copy / "encoder.onnx")}
    write_manifest(copy, dataclasses.replace(manifest, files=files))
    with pytest.raises(ExportError, match="not laid out as this version exports"):
        recover(copy)


def test_a_sentencepiece_bundle_recovers_with_its_tokenizer_models(tmp_path: Path) -> None:
    from export.pipeline import ExportOptions, export_checkpoint
    from tests.export.test_export import trained_checkpoint

    sp = ["data.src_tokenizer=sentencepiece", "data.tgt_tokenizer=sentencepiece", "data.sp_vocab_size=30"]
    ckpt = trained_checkpoint(tmp_path, sp, steps=10)
    target = tmp_path / "repo" / "sp" / "1"
    export_checkpoint(ckpt, target, ExportOptions(name="sp", version=1, parity_limit=10, progress=False))
    original, recovered = load_checkpoint(ckpt), recover(target)
    assert recovered["files"] == original["files"] and set(recovered["files"]) == {"src_spm.model", "tgt_spm.model"}
    assert recovered["tokenizers"] == original["tokenizers"]
    for key, tensor in original["model"].items():
        assert torch.equal(recovered["model"][key], tensor), key
    _, _, src_tok, _ = model_from_checkpoint(recovered)
    assert src_tok.tokenize("abcab") == model_from_checkpoint(original)[2].tokenize("abcab")
