"""Sequence-level distillation (teacher outputs for the training split, training on them); size arguments checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.cli import main as seqserve
from tests.training.test_training import TINY
from training.cli import main
from training.config import load_config
from training.data import DataError
from training.ensemble import load_models
from training.train import Trainer, decode_scored, load_datasets


def teacher(tmp_path: Path) -> Path:
    cfg = load_config(None, [*TINY, "train.epochs=1"])
    Trainer(cfg, tmp_path / "teacher").run(progress=False)
    return tmp_path / "teacher" / "best.pt"


def test_distill_writes_the_teachers_output_for_every_training_source(tmp_path: Path) -> None:
    ckpt = teacher(tmp_path)
    out = tmp_path / "kd.tsv"
    assert main(["distill", str(ckpt), "--beam", "2", "--out", str(out)]) == 0
    model, cfg, src_tok, tgt_tok, _ = load_models([ckpt])
    train = load_datasets(cfg.data, cfg.train.seed).train
    scored = decode_scored(model, train, src_tok, tgt_tok, torch.device("cpu"), beam=2, batch_size=256)
    expected = [h for h, _ in scored]
    written = [tuple(line.split("\t")) for line in out.read_text().splitlines()]
    assert written == [(ex.src, " ".join(h)) for ex, h in zip(train, expected, strict=True)]  # in split order
    assert any(hyp not in ex.refs for (_, hyp), ex in zip(written, train, strict=True))  # a teacher, not a copy


def test_training_on_distilled_targets_uses_them_and_keeps_the_vocabularies(tmp_path: Path) -> None:
    base = load_config(None, TINY)
    train = load_datasets(base.data, base.train.seed).train
    kd = tmp_path / "kd.tsv"
    kd.write_text("".join(f"{ex.src}\ta b c\n" for ex in train))  # a "teacher" that always says "a b c"
    plain = Trainer(base, tmp_path / "plain")
    distilled = Trainer(load_config(None, [*TINY, f"data.distill={kd}"]), tmp_path / "kd")
    assert distilled.pairs == [(src, "a b c") for src in dict.fromkeys(ex.src for ex in train)]
    assert distilled.tgt_tok.vocab.itos == plain.tgt_tok.vocab.itos  # init_from / ensembles still fit
    assert distilled.data.source["distill"] == "kd.tsv" and len(distilled.data.source["distill_sha256"]) == 64


def test_distilled_targets_for_other_sources_are_refused(tmp_path: Path) -> None:
    kd = tmp_path / "kd.tsv"
    kd.write_text("zzzzzzzzzzzzzzzz\ta b\n")  # not a training source (e.g. a dev or test word)
    with pytest.raises(DataError, match="not in the training split"):
        Trainer(load_config(None, [*TINY, f"data.distill={kd}"]), tmp_path / "run")


def test_distill_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["distill", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "kd.tsv")]) == 2
    assert "not found" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    assert main(["distill", str(junk), "--out", str(tmp_path / "kd.tsv")]) == 2
    err = capsys.readouterr().err
    assert "not a readable seqserve checkpoint" in err and "Traceback" not in err
    assert not (tmp_path / "kd.tsv").exists()


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        ("eval", "--beam", "0"),
        ("eval", "--batch-size", "-1"),
        ("eval", "--limit", "x"),
        ("distill", "--beam", "0"),
        ("distill", "--max-len", "0"),
        ("export", "--beam", "0"),
        ("export", "--parity-limit", "-3"),
    ],
)
def test_search_sizes_must_be_whole_numbers_in_range(
    command: str, flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "best.pt"
    ckpt.write_text("never read: the arguments are refused first")
    required = ["--out", str(tmp_path / "out")] if command != "eval" else []
    with pytest.raises(SystemExit) as exc:
        seqserve([command, str(ckpt), *required, flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("repo/m/01", "--out must end in a positive integer version directory"),  # the server would not load it
        ("repo/m/\u0661", "--out must end in a positive integer version directory"),
        ("repo/m/0", "--out must end in a positive integer version directory"),
        ("file/m/1", "cannot create"),  # a file where the model directory's parent should be
    ],
)
def test_export_refuses_an_unusable_destination_before_any_work(
    out: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "best.pt"
    ckpt.write_text("never read: the destination is refused first")
    (tmp_path / "file").write_text("not a directory")
    assert seqserve(["export", str(ckpt), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seqserve export: {message}") and "Traceback" not in err
