"""Checkpoint averaging: epoch snapshots are kept, the average is the mean, it decodes, bad inputs refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.test_training import TINY
from training.average import AverageError, average_checkpoints
from training.cli import main
from training.config import load_config
from training.train import Trainer, load_checkpoint, model_from_checkpoint


def run(tmp_path: Path, extra: list[str]) -> Path:
    Trainer(load_config(None, [*TINY, *extra]), tmp_path).run(progress=False)
    return tmp_path


def test_training_keeps_the_last_n_epoch_snapshots_without_optimizer_state(tmp_path: Path) -> None:
    out = run(tmp_path, ["train.epochs=3", "train.keep_checkpoints=2", "train.early_stop_patience=9"])
    assert sorted(p.name for p in out.glob("epoch-*.pt")) == ["epoch-002.pt", "epoch-003.pt"]
    snapshot = load_checkpoint(out / "epoch-003.pt")
    assert "optimizer" not in snapshot and "rng" not in snapshot
    last = load_checkpoint(out / "last.pt")  # written after the same epoch: the same weights
    for name, tensor in last["model"].items():
        assert torch.equal(snapshot["model"][name], tensor), name


def test_no_snapshots_unless_asked(tmp_path: Path) -> None:
    out = run(tmp_path, ["train.epochs=1"])
    assert not list(out.glob("epoch-*.pt"))


def test_average_is_the_elementwise_mean_and_decodes(tmp_path: Path) -> None:
    out = run(tmp_path, ["train.epochs=2", "train.keep_checkpoints=2", "train.early_stop_patience=9"])
    paths = [out / "epoch-001.pt", out / "epoch-002.pt"]
    assert main(["average", *map(str, paths), "--out", str(out / "avg.pt")]) == 0
    a, b, avg = (load_checkpoint(p) for p in [*paths, out / "avg.pt"])
    differs = 0
    for name, tensor in avg["model"].items():
        torch.testing.assert_close(tensor, (a["model"][name] + b["model"][name]) / 2, rtol=0, atol=1e-6)
        differs += not torch.equal(a["model"][name], b["model"][name])
    assert differs > 0  # the epochs really differed: the test would see a wrong mean
    assert avg["state"]["averaged_steps"] == [a["state"]["step"], b["state"]["step"]]
    model, _, src_tok, _ = model_from_checkpoint(avg)  # a checkpoint eval/export take like best.pt
    src = torch.tensor([src_tok.encode("abc")])
    log_probs = model(src, torch.tensor([src.shape[1]]), torch.tensor([[1, 4]]))
    assert torch.isfinite(log_probs).all()


def test_average_of_one_checkpoint_is_that_checkpoint(tmp_path: Path) -> None:
    out = run(tmp_path, ["train.epochs=1"])
    ckpt = load_checkpoint(out / "best.pt")
    avg = average_checkpoints([ckpt], ["best.pt"])
    for name, tensor in ckpt["model"].items():
        assert torch.equal(avg["model"][name], tensor)


def test_different_architectures_are_refused(tmp_path: Path) -> None:
    a = load_checkpoint(run(tmp_path / "a", ["train.epochs=1"]) / "best.pt")
    b = load_checkpoint(run(tmp_path / "b", ["train.epochs=1", "model.dec_hidden=24"]) / "best.pt")
    with pytest.raises(AverageError, match=r"different model architecture than a\.pt \(dec_hidden\)"):
        average_checkpoints([a, b], ["a.pt", "b.pt"])
    calibrated = {**a, "config": {**a["config"], "model": {**a["config"]["model"], "temperature": 2.0}}}
    with pytest.raises(AverageError, match=r"\(temperature\)"):
        average_checkpoints([a, calibrated], ["a.pt", "calibrated.pt"])
    older = {**a, "config": {**a["config"], "model": dict(a["config"]["model"])}}
    del older["config"]["model"]["temperature"]  # saved before model.temperature existed: the default, 1
    average_checkpoints([a, older], ["a.pt", "older.pt"])


def test_cli_reports_missing_and_unreadable_files_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["average", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "avg.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert main(["average", str(junk), "--out", str(tmp_path / "avg.pt")]) == 2
    err = capsys.readouterr().err
    assert "not a readable seqserve checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "avg.pt").exists()
