"""Every architecture option trains; clipping, resume, the CMUdict split, tokenizers, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.config import ConfigError, load_config
from training.data import DataError, Example, read_cmudict, read_tsv, split_key, split_of
from training.evaluate import calibration, score
from training.train import Trainer, build_tokenizers, load_datasets

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "data.dataset=reverse",
    "data.synthetic_size=400",
    "model.emb_size=16",
    "model.enc_hidden=16",
    "model.dec_hidden=32",
    "model.enc_layers=2",
    "model.dec_layers=2",
    "model.attn_hidden=16",
    "train.batch_size=16",
    "train.lr=0.01",
    "train.num_threads=1",
]

ARCHITECTURES = {
    "lstm-none": ["model.attention=none"],
    "lstm-dot": ["model.attention=dot"],
    "lstm-general": ["model.attention=general"],
    "lstm-concat": ["model.attention=concat"],
    "lstm-local-m": ["model.attention=local-m", "model.local_window=2", "model.reverse_source=true"],
    "lstm-local-p": ["model.attention=local-p", "model.local_window=2"],
    "gru": ["model.cell=gru"],
    "rnn-unidirectional": ["model.cell=rnn", "model.bidirectional=false"],
    "reversed-no-input-feed": ["model.reverse_source=true", "model.input_feed=false", "model.bidirectional=false"],
    "tied-embeddings": ["model.tie_embeddings=true", "model.emb_size=32"],
    "copy": ["model.copy=true", "data.shared_vocab=true"],
    "no-forget-bias": ["model.forget_bias=0.0", "model.dropout=0.0", "model.emb_dropout=0.0"],
    "temperature": ["model.temperature=2.5"],  # what seqserve calibrate sets; export must carry it
}


def trainer(tmp_path: Path, extra: list[str]) -> Trainer:
    return Trainer(load_config(None, TINY + extra), tmp_path)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_learns(name: str, tmp_path: Path) -> None:
    t = trainer(tmp_path, ARCHITECTURES[name])
    losses = []
    for epoch in range(3):
        for batch in t.epoch_batches(epoch):
            losses.append(t.train_step(batch)[0])
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (name, first, last)


def test_gradient_clipping_bounds_the_norm(tmp_path: Path) -> None:
    t = trainer(tmp_path, ["train.clip_norm=0.01"])
    batch = next(iter(t.epoch_batches(0)))
    _, pre_clip = t.train_step(batch)
    assert pre_clip > 0.01
    # the step applied clipped gradients: their norm is what clipping promised
    grads = [p.grad.detach().flatten() for p in t.model.parameters() if p.grad is not None]
    clipped = torch.linalg.vector_norm(torch.cat(grads))
    assert float(clipped) <= 0.01 * (1 + 1e-4)


def test_resume_gives_the_same_next_loss(tmp_path: Path) -> None:
    extra = ["model.dropout=0.3", "model.emb_dropout=0.2"]  # randomness must be restored too
    a = trainer(tmp_path, extra)
    batches = iter(a.epoch_batches(0))
    for i in range(5):
        a.train_step(next(batches))
        a.state["batch_in_epoch"] = i + 1
    a.save("last.pt")
    continued = a.train_step(next(batches))

    b = trainer(tmp_path, extra)
    assert b.resume()
    assert b.state["step"] == 5
    rest = iter(b.epoch_batches(0))
    for _ in range(b.state["batch_in_epoch"]):
        next(rest)
    resumed = b.train_step(next(rest))
    assert resumed == pytest.approx(continued, abs=1e-6)


def test_train_pauses_and_resumes_from_the_run_directory(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.epochs=2", "train.max_steps=7"])
    first = Trainer(cfg, tmp_path).run(progress=False)
    assert first["stopped"] == "max_steps" and first["step"] == 7
    second = Trainer(replace(cfg, train=replace(cfg.train, max_steps=0)), tmp_path).run(progress=False)
    assert second["epoch"] == 2 and second["step"] == 2 * 25  # 400 pairs / 16 per batch, 2 epochs
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["event"] == "dev"] == [1, 1, 2]
    assert (tmp_path / "best.pt").is_file()


def test_config_errors_are_clear() -> None:
    with pytest.raises(ConfigError, match=r"model\.cell must be one of"):
        load_config(None, ["model.cell=transformer"])
    with pytest.raises(ConfigError, match="dot attention needs"):
        load_config(None, ["model.attention=dot", "model.enc_hidden=100"])
    with pytest.raises(ConfigError, match="unknown override key"):
        load_config(None, ["model.size=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1", r"train\.lr must be in \(0, inf\), got -1\.0"),
        ("train.lr=inf", r"train\.lr must be in \(0, inf\), got inf"),
        ("train.clip_norm=0", r"train\.clip_norm must be in \(0, inf\)"),
        ("train.batch_size=0", r"train\.batch_size must be in \[1, inf\)"),
        ("train.lr_decay=1.5", r"train\.lr_decay must be in \(0, 1\]"),
        ("train.label_smoothing=1", r"train\.label_smoothing must be in \[0, 1\)"),
        ("data.max_src_len=0", r"data\.max_src_len must be in \[1, inf\)"),
        ("data.tgt_tokenizer=bpe", r"data\.tgt_tokenizer must be one of"),
    ],
)
def test_values_out_of_range_are_refused_before_training(override: str, message: str) -> None:
    """They used to reach torch (``train.lr=-1``: a traceback from Adam) or fail later, less clearly."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    load_config(None, ["train.lr_decay=1", "train.label_smoothing=0.999", "train.max_steps=0"])  # edges allowed


def train_refused(out: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    """`seqserve train` on TINY with overrides must refuse: exit 2, one line on stderr (returned), no traceback."""
    from training.cli import main

    sets = [arg for o in [*TINY, "train.max_steps=1", *overrides] for arg in ("--set", o)]
    assert main(["train", "--out", str(out), "--no-progress", *sets]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    return err


def test_train_refuses_devices_and_files_it_cannot_use_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*overrides: str) -> str:
        return train_refused(tmp_path / "run", capsys, *overrides)

    assert "train.device must be auto, cpu, cuda or cuda:N, got 'tpu'" in run("train.device=tpu")
    if not torch.cuda.is_available():  # (a machine with a GPU would train here instead)
        assert "sees no CUDA device; use train.device=auto or cpu" in run("train.device=cuda")
    missing = str(tmp_path / "absent.dict")
    assert missing in run("data.dataset=cmudict", f"data.cmudict_file={missing}")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_tsv_pairs_group_references_and_keep_empty_targets(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_bytes(b"read\tR IY1 D\r\nread\tR EH1 D\r\n\r\nuh\t\nread\tR IY1 D\n")  # CRLF, blank, repeat
    assert read_tsv(path) == [Example("read", ("R IY1 D", "R EH1 D")), Example("uh", ("",))]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"abc\tc b a\nab\xff\tx\n", r"pairs\.tsv:2: not UTF-8 text \(byte 3 of the line\)"),
        (b"abc\tc b a\n\tx y\n", r"pairs\.tsv:2: the source is empty"),
        (b"abc\tc\tb\n", r"pairs\.tsv:1: expected 'source<TAB>target', got 3 field\(s\)"),
        (b"\n\n", r"pairs\.tsv: no 'source<TAB>target' lines"),
    ],
)
def test_bad_tsv_files_are_refused_with_the_line(tmp_path: Path, content: bytes, message: str) -> None:
    """They used to be a UnicodeDecodeError traceback, or trained silently on empty sources or on nothing."""
    path = tmp_path / "pairs.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_tsv(path)


def test_split_rule_puts_known_words_where_the_rule_says() -> None:
    assert split_key("dog's") == "dog" and split_key("dogs'") == "dogs" and split_key("o'clock") == "o'clock"
    # bucket = int(sha256("cmudict-g2p-v1:" + key)[:8], 16) % 100; < 10 test, 10-14 dev, else train
    import hashlib

    def bucket(key: str) -> int:
        return int(hashlib.sha256(("cmudict-g2p-v1:" + key).encode()).hexdigest()[:8], 16) % 100

    words = ["hello", "world", "dog", "cat", "phoneme", "aardvark", "zebra", "seqserve", "knight", "yacht"]
    for w in words:
        b = bucket(w)
        assert split_of(w) == ("test" if b < 10 else "dev" if b < 15 else "train")
        assert split_of(w + "'s") == split_of(w)  # a possessive goes with its word


def test_cmudict_split_sizes_and_variants() -> None:
    splits = read_cmudict()
    sizes = {k: len(v) for k, v in splits.items()}
    assert abs(sizes["train"] - 106_190) < 100 and abs(sizes["dev"] - 6_183) < 50 and abs(sizes["test"] - 12_534) < 50
    words = {ex.src: ex for ex in splits["train"] + splits["dev"] + splits["test"]}
    assert len(words["tomato"].refs) >= 2  # (2), (3) variants are extra references
    assert all(all(c.islower() or c == "'" for c in w) for w in words)


def test_scoring_wer_per_and_stress() -> None:
    hyps = [["HH", "AH0", "L", "OW1"], ["K", "AE1", "T"]]
    refs = [[["HH", "AH0", "L", "OW1"], ["HH", "EH0", "L", "OW1"]], [["K", "AE2", "T"]]]
    with_stress = score(hyps, refs, stress=True)
    assert with_stress.wer == 0.5 and with_stress.per == pytest.approx(1 / 7)
    without = score(hyps, refs, stress=False)
    assert without.wer == 0.0 and without.per == 0.0


def test_calibration_compares_the_best_hypothesis_probability_with_how_often_it_is_right() -> None:
    right, wrong = ["K", "AE1", "T"], ["K", "AE2", "T"]
    refs = [[right]] * 20
    # 10 words at p = 0.95 of which 5 are right (bin 0.9-1.0: 0.45 off), 10 at p = 0.35 of which 3 or 4 are right
    hyps = [right] * 5 + [wrong] * 5 + [right] * 4 + [wrong] * 6
    log_probs = [math.log(0.95)] * 10 + [math.log(0.35)] * 10
    result = calibration(log_probs, hyps, refs)
    assert result["confidence"] == pytest.approx(0.65)
    assert result["ece"] == pytest.approx((10 * 0.45 + 10 * 0.05) / 20)
    calibrated = calibration([math.log(0.5)] * 4, [right, wrong, right, wrong], [[right]] * 4)
    assert calibrated["ece"] == pytest.approx(0.0, abs=1e-12)
    nothing = calibration([-math.inf], [[]], [[right]])  # no hypothesis: probability 0, and wrong
    assert nothing == {"confidence": 0.0, "ece": 0.0}
    with pytest.raises(ValueError, match="1 scores, 2 hypotheses"):
        calibration([0.0], [right, right], [[right], [right]])


@pytest.mark.parametrize("kind", ["char", "word", "sentencepiece"])
def test_tokenizers_round_trip(kind: str) -> None:
    cfg = load_config(
        None,
        ["data.dataset=reverse", f"data.src_tokenizer={kind}", f"data.tgt_tokenizer={kind}", "data.sp_vocab_size=30"],
    )
    data = load_datasets(cfg.data, 1)
    if kind == "word":
        data.train = [Example(" ".join(ex.src), ex.refs) for ex in data.train]
    src, _tgt, files = build_tokenizers(cfg.data, data)
    assert src.vocab.itos[:4] == ["<pad>", "<s>", "</s>", "<unk>"]
    text = data.train[0].src
    assert src.detokenize(src.tokenize(text)) == text
    assert (kind == "sentencepiece") == bool(files)


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun not installed",
)
def test_ddp_with_two_processes(tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    args = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.cli",
        "train",
        "--out",
        str(tmp_path),
        "--no-progress",
        *[a for o in [*TINY, "train.epochs=1"] for a in ("--set", o)],
    ]
    result = subprocess.run(
        args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    check = [r for r in log if r["event"] == "ddp_check"]
    assert check and check[0]["world"] == 2 and check[0]["replicas_in_sync"]
    dev = [r for r in log if r["event"] == "dev"]
    assert dev[-1]["step"] == 12  # 400 pairs / 16 per batch = 25 batches, split over 2 ranks


@pytest.mark.parametrize(("select_on", "best_epochs", "decayed"), [("wer", [1, 2], 1), ("loss", [1, 3], 1)])
def test_best_checkpoint_follows_the_chosen_dev_metric(
    select_on: str, best_epochs: list[int], decayed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # scripted dev results where the two metrics disagree: WER is best at epoch 2, loss at epoch 3
    script = iter(
        [{"dev_wer": 0.5, "dev_loss": 1.0}, {"dev_wer": 0.4, "dev_loss": 1.2}, {"dev_wer": 0.45, "dev_loss": 0.9}]
    )
    monkeypatch.setattr(Trainer, "evaluate", lambda self: next(script) | {"dev_nostress_wer": 0.0})
    t = trainer(tmp_path, ["train.epochs=3", f"train.select_on={select_on}", "train.early_stop_patience=9"])
    result = t.run(progress=False)
    assert result["select_on"] == select_on
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {r["epoch"]: r["step"] for r in log if r["event"] == "dev"}
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["state"]["step"] == steps[best_epochs[-1]]
    assert t.state["lr"] == pytest.approx(0.01 * 0.5**decayed)  # one epoch without improvement: one decay


def test_resume_of_a_run_from_before_select_on(tmp_path: Path) -> None:
    a = trainer(tmp_path, [])
    a.state.pop("best_score")
    a.state.pop("select_on")
    a.state["best_wer"] = 0.25  # the state layout older checkpoints carry
    a.save("last.pt")
    b = trainer(tmp_path, [])
    assert b.resume() and b.state["best_score"] == 0.25 and "best_wer" not in b.state
    c = trainer(tmp_path, ["train.select_on=loss"])  # another metric: a WER is no best loss
    assert c.resume() and c.state["best_score"] == float("inf") and c.state["select_on"] == "loss"


def test_select_on_must_be_a_known_metric() -> None:
    with pytest.raises(ConfigError, match=r"train\.select_on must be one of"):
        load_config(None, ["train.select_on=bleu"])
