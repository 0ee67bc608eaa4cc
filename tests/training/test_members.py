"""``python -m training.members``: seeds trained side by side, their best weights exported in float16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.test_training import TINY
from training.members import main
from training.train import load_checkpoint, model_from_checkpoint

SETS = [arg for o in [*TINY, "train.epochs=2"] for arg in ("--set", o)]


def test_members_train_side_by_side_and_export_half_precision_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, export = tmp_path / "runs", tmp_path / "export"
    assert main(["--out", str(runs), "--seeds", "3", "4", "--minutes", "5", "--export", str(export), *SETS]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seed"] for r in records] == [3, 4]
    assert all(r["exit"] == 0 and r["epochs"] == 2 and len(r["dev_nostress_wer"]) == 2 for r in records)
    a, b = (load_checkpoint(export / f"member-seed-{seed}.pt") for seed in (3, 4))
    assert "optimizer" not in a and a["state"]["weights_dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in a["model"].values() if t.is_floating_point())
    full = load_checkpoint(runs / "seed-3" / "best.pt")
    model = model_from_checkpoint(a)[0]  # widened back to float32 on load, within float16's rounding
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.allclose(value, full["model"][key], rtol=1e-3, atol=1e-4), key
    key = next(iter(a["model"]))
    assert not torch.equal(a["model"][key], b["model"][key])  # independent members: other seeds, other weights


def test_a_member_stopped_before_its_first_epoch_fails_the_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0.6 s in all: not even torch is imported by then, so the run is stopped hard and has no best.pt
    assert main(["--out", str(tmp_path), "--seeds", "1", "--minutes", "0.001", "--grace", "0.01", *SETS]) == 1
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["seed"] == 1 and record["exit"] != 0 and "exported" not in record and "log_tail" in record


def test_a_member_that_cannot_start_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--seeds", "1", "--minutes", "1", *SETS, "--set", "train.lr=-1"]) == 1
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["exit"] == 2 and any("train.lr must be in (0, inf)" in line for line in record["log_tail"])


def test_members_need_distinct_seeds(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--seeds", "2", "2", "--minutes", "1"])
    assert exc.value.code == 2
