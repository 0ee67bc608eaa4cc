"""Temperature scaling: seqserve calibrate fits T on dev; the calibrated checkpoint decodes and exports with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.runtime.bundle import Bundle
from tests.training.test_training import TINY
from training.calibrate import calibrate_file, fit_temperature, mean_nll
from training.cli import main
from training.config import load_config
from training.data import batches, training_pairs
from training.train import Trainer, decode_scored, load_checkpoint, load_datasets, model_from_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("calibrate") / "run"
    Trainer(load_config(None, [*TINY, "train.epochs=2"]), run).run(progress=False)
    return run / "best.pt"


def test_the_fitted_temperature_is_where_dev_nll_is_lowest_and_follows_overconfidence(trained: Path) -> None:
    model, cfg, src_tok, tgt_tok = model_from_checkpoint(load_checkpoint(trained))
    dev = list(batches(training_pairs(load_datasets(cfg.data, cfg.train.seed).dev), 64, src_tok, tgt_tok, False, 0))
    t = fit_temperature(model, dev)
    best = mean_nll(model, dev, t)
    assert best <= mean_nll(model, dev, t * 1.1) and best <= mean_nll(model, dev, t / 1.1)
    assert best <= mean_nll(model, dev, 1.0)
    with torch.no_grad():  # three times sharper logits need a three times higher temperature
        model.out.weight.mul_(3.0)
        model.out.bias.mul_(3.0)
    assert fit_temperature(model, dev) == pytest.approx(3.0 * t, rel=0.02)


def test_calibrated_checkpoint_keeps_greedy_outputs_and_tempers_the_probabilities(
    trained: Path, tmp_path: Path
) -> None:
    out = tmp_path / "calibrated.pt"
    record = calibrate_file(trained, out)
    before, after = record["dev_nll"]
    assert after <= before and record["previous_temperature"] == 1.0
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["model"]["temperature"] == record["temperature"] != 1.0
    assert "optimizer" not in ckpt and ckpt["state"]["calibration"] == record
    plain, cfg, src_tok, tgt_tok = model_from_checkpoint(load_checkpoint(trained))
    tempered = model_from_checkpoint(ckpt)[0]
    dev = load_datasets(cfg.data, cfg.train.seed).dev[:40]
    cpu = torch.device("cpu")
    greedy_plain = decode_scored(plain, dev, src_tok, tgt_tok, cpu, beam=1)
    greedy_tempered = decode_scored(tempered, dev, src_tok, tgt_tok, cpu, beam=1)
    assert [h for h, _ in greedy_plain] == [h for h, _ in greedy_tempered]  # argmax unchanged
    assert [lp for _, lp in greedy_plain] != [lp for _, lp in greedy_tempered]
    batch = next(iter(batches(training_pairs(dev), 8, src_tok, tgt_tok, False, 0)))
    with torch.no_grad():
        lp_plain = plain(batch.src, batch.src_len, batch.tgt_in)
        lp_tempered = tempered(batch.src, batch.src_len, batch.tgt_in)
    expected = torch.log_softmax(lp_plain / record["temperature"], dim=-1)  # = log_softmax(logits / T)
    assert torch.allclose(lp_tempered, expected, atol=1e-5)


def test_calibrated_bundle_serves_the_tempered_probabilities(trained: Path, tmp_path: Path) -> None:
    from export.pipeline import ExportOptions, export_checkpoint

    out = tmp_path / "calibrated.pt"
    assert main(["calibrate", str(trained), "--out", str(out)]) == 0
    target = tmp_path / "repo" / "m" / "1"
    manifest = export_checkpoint(out, target, ExportOptions(name="m", version=1, parity_limit=30, progress=False))
    assert manifest.parity["nbest_identical"] == 30
    temperature = load_checkpoint(out)["config"]["model"]["temperature"]
    assert manifest.architecture["temperature"] == temperature
    assert f"temperature {temperature:.3g}" in manifest.summary()
    Bundle(target)


def test_calibrate_errors_are_one_line(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tmp_path / "absent.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["calibrate", str(trained), "--out", str(trained)]) == 2
    err = capsys.readouterr().err
    assert "--out must differ" in err and "Traceback" not in err
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    assert main(["calibrate", str(junk), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a readable seqserve checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
