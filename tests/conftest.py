"""Session fixtures: a tiny model trained and exported in seconds (no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_MODEL = [
    "data.dataset=reverse",
    "data.synthetic_size=1500",
    "data.max_tgt_len=20",
    "model.emb_size=24",
    "model.enc_hidden=24",
    "model.dec_hidden=48",
    "model.enc_layers=1",
    "model.dec_layers=1",
    "model.attn_hidden=16",
    "model.dropout=0.0",
    "model.emb_dropout=0.0",
    "train.epochs=6",
    "train.batch_size=32",
    "train.lr=0.005",
]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.config import load_config
    from training.train import train

    out = tmp_path_factory.mktemp("tiny-run")
    train(load_config(None, TINY_MODEL), out, resume=False, progress=False)
    return out / "best.pt"


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<repo>/rev/1``: the tiny string-reversal model, exported with parity checked."""
    from export.pipeline import ExportOptions, export_checkpoint

    repo = tmp_path_factory.mktemp("bundles")
    export_checkpoint(
        tiny_checkpoint, repo / "rev" / "1", ExportOptions(name="rev", version=1, parity_limit=100, progress=False)
    )
    return repo / "rev" / "1"


@pytest.fixture
def model_repo(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A fresh model repository holding a copy of the tiny bundle."""
    repo = tmp_path / "models"
    shutil.copytree(tiny_bundle, repo / "rev" / "1")
    return repo


@pytest.fixture(scope="session")
def tiny_graphone(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A graphone 3-gram of the tiny model's training split (``seqserve graphone``'s code path)."""
    from training.graphone import build_from_checkpoint

    out = tmp_path_factory.mktemp("graphone") / "rev.npz"
    build_from_checkpoint(tiny_checkpoint, out, order=3)
    return out


@pytest.fixture(scope="session")
def rescored_bundle(tiny_checkpoint: Path, tiny_graphone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<repo>/rev/1`` with the graphone rescorer, its weights tuned on the tiny model's dev split."""
    from export.pipeline import ExportOptions, export_checkpoint

    repo = tmp_path_factory.mktemp("rescored")
    options = ExportOptions(name="rev", version=1, parity_limit=50, progress=False, graphone=tiny_graphone)
    export_checkpoint(tiny_checkpoint, repo / "rev" / "1", options)
    return repo / "rev" / "1"
