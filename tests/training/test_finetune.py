"""Fine-tuning a trained model (``train.init_from``) on other data: it keeps the checkpoint's vocabularies."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import TINY_MODEL
from training.cli import main
from training.train import load_checkpoint

# the tiny model's architecture, without its data and training settings
ARCH = [o for o in TINY_MODEL if o.startswith("model.")]


def write_tsv(path: Path, n: int, seed: int, silent: str = "", extra_target: str = "", every: int = 5) -> Path:
    """Reversal pairs over the tiny model's letters; ``silent`` is appended to every fourth source and not spoken,
    ``extra_target`` to every ``every``-th target."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(4, 9)))
        target = " ".join(reversed(word))
        if silent and i % 4 == 0:
            word += silent
        if extra_target and i % every == 0:
            target += f" {extra_target}"
        lines.append(f"{word}\t{target}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(out: Path, *overrides: str) -> int:
    sets = [arg for o in [*ARCH, "train.batch_size=32", "train.lr=0.002", *overrides] for arg in ("--set", o)]
    return main(["train", "--out", str(out), "--no-progress", *sets])


def dev_wer(out: Path) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return float(next(r for r in records if r["event"] == "dev")["dev_wer"])  # after the first epoch


def test_fine_tuning_keeps_the_vocabularies_reads_unknown_sources_as_unk_and_starts_ahead(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = [
        "data.dataset=tsv",
        f"data.train={write_tsv(tmp_path / 'train.tsv', 200, 1, silent='z')}",
        f"data.dev={write_tsv(tmp_path / 'dev.tsv', 40, 2, silent='z')}",
        "train.epochs=1",
    ]
    tuned, scratch = tmp_path / "tuned", tmp_path / "scratch"
    assert run(tuned, *data, f"train.init_from={tiny_checkpoint}") == 0
    out = capsys.readouterr().out
    assert "source token(s) of the training data are not in best.pt's vocabulary and are read as <unk>: 'z' x50" in out
    base, last = load_checkpoint(tiny_checkpoint), load_checkpoint(tuned / "last.pt")
    assert last["vocabs"] == base["vocabs"] and last["tokenizers"] == base["tokenizers"]
    assert run(scratch, *data) == 0  # the same budget from scratch, vocabularies built from this data
    assert "z" in load_checkpoint(scratch / "last.pt")["vocabs"]["src"]
    assert dev_wer(tuned) < 0.5 < dev_wer(scratch)  # one epoch of 200 pairs: only the fine-tuned model can reverse
    # resuming the fine-tuning run keeps going with the same vocabularies
    assert run(tuned, *data[:-1], "train.epochs=2", f"train.init_from={tiny_checkpoint}") == 0
    assert "resumed at step" in capsys.readouterr().out


def test_targets_outside_the_vocabulary_and_other_architectures_are_refused_in_one_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(*overrides: str) -> str:
        assert run(tmp_path / "run", "data.dataset=tsv", "train.max_steps=1", *overrides) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1
        return err

    dev = f"data.dev={write_tsv(tmp_path / 'dev.tsv', 20, 2)}"
    bad = f"data.train={write_tsv(tmp_path / 'bad.tsv', 50, 1, extra_target='XX')}"  # in every fifth target
    err = refused(bad, dev, f"train.init_from={tiny_checkpoint}")
    assert "% of the training targets' tokens are not in the checkpoint's vocabulary ('XX' x10)" in err
    good = f"data.train={write_tsv(tmp_path / 'good.tsv', 50, 1)}"
    err = refused(good, dev, f"train.init_from={tiny_checkpoint}", "model.dec_hidden=64")
    assert "another architecture: dec_hidden 48 (here 64)" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_rare_target_token_outside_the_vocabulary_is_learned_as_unk_and_reported(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_tsv(tmp_path / "train.tsv", 200, 1, extra_target="XX", every=100)  # 2 of ~1,500 target tokens
    sets = ["data.dataset=tsv", f"data.train={train}", f"data.dev={write_tsv(tmp_path / 'dev.tsv', 20, 2)}"]
    assert run(tmp_path / "run", *sets, "train.max_steps=2", f"train.init_from={tiny_checkpoint}") == 0
    assert (
        "2 target token(s) of the training data are not in best.pt's vocabulary and are learned as <unk>: 'XX' x2"
        in (capsys.readouterr().out)
    )
