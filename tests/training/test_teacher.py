"""Word-level distillation: a teacher's top-K distributions as soft targets (train.teacher)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.test_training import TINY, train_refused
from training.config import ConfigError, load_config
from training.model import nll_loss, soft_cross_entropy
from training.train import Trainer


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two tiny models trained one epoch each on the same data (train.seed also seeds the synthetic data)."""
    root = tmp_path_factory.mktemp("teachers")
    paths = []
    for name, lr in (("t1", "0.01"), ("t2", "0.005")):
        cfg = load_config(None, [*TINY, "train.epochs=1", f"train.lr={lr}"])
        Trainer(cfg, root / name).run(progress=False)
        paths.append(root / name / "best.pt")
    return paths


def student(tmp_path: Path, *extra: str) -> Trainer:
    return Trainer(load_config(None, [*TINY, *extra]), tmp_path)


def test_soft_cross_entropy_is_the_dense_cross_entropy_over_real_positions() -> None:
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 5, 7), dim=-1)
    teacher = torch.softmax(torch.randn(3, 5, 7), dim=-1)
    target = torch.tensor([[4, 5, 6, 2, 0], [4, 2, 0, 0, 0], [5, 5, 5, 5, 2]])  # 0 = <pad>
    ids = torch.arange(7).expand(3, 5, 7)
    mask = target != 0
    dense = (-(teacher * log_probs).sum(-1) * mask).sum() / mask.sum()
    assert float(soft_cross_entropy(log_probs, ids, teacher, target, 0)) == pytest.approx(float(dense), rel=1e-6)
    one_hot = torch.ones(3, 5, 1)  # all mass on the reference token: the plain NLL
    sparse = soft_cross_entropy(log_probs, target.unsqueeze(-1), one_hot, target, 0)
    assert float(sparse) == pytest.approx(float(nll_loss(log_probs, target, 0)), rel=1e-6)


def test_teacher_targets_are_the_members_mean_distribution_top_k(tmp_path: Path, teachers: list[Path]) -> None:
    t = student(tmp_path, f"train.teacher={teachers[0]},{teachers[1]}", "train.kd_top_k=3")
    assert t.teacher is not None
    batch = next(iter(t.epoch_batches(0)))
    ids, probs = t.teacher.targets(batch)
    assert ids.shape == probs.shape == (*batch.tgt_out.shape, 3)
    with torch.no_grad():
        mean = torch.stack(
            [m(batch.src, batch.src_len, batch.tgt_in, batch.src_ext).exp() for m in t.teacher.members]
        ).mean(0)
    top, top_ids = mean.topk(3, dim=-1)
    real = batch.tgt_out != 0
    assert torch.equal(ids[real], top_ids[real])
    expected = top / top.sum(-1, keepdim=True)  # renormalised over the K kept tokens
    assert torch.allclose(probs[real], expected[real], atol=2e-3)  # cached as float16
    assert torch.all(probs[~real] == 0)  # padding carries no target
    assert torch.allclose(probs[real].sum(-1), torch.ones(int(real.sum())), atol=2e-3)
    names = t.data.source["teacher"].split(",")
    assert names == ["best.pt", "best.pt"] and len(t.data.source["teacher_sha256"].split(",")) == 2


def test_the_teacher_reads_each_pair_once_and_the_student_moves_towards_it(
    tmp_path: Path, teachers: list[Path]
) -> None:
    t = student(tmp_path, f"train.teacher={teachers[0]}", "train.kd_weight=1.0", "train.kd_top_k=50")
    assert t.teacher is not None
    probe = next(iter(t.epoch_batches(99)))
    real = probe.tgt_out != 0

    def kl_to_teacher() -> float:
        t.model.eval()
        with torch.no_grad():
            p_teacher = t.teacher.members[0](probe.src, probe.src_len, probe.tgt_in, probe.src_ext)  # type: ignore[union-attr]
            p_student = t.model(probe.src, probe.src_len, probe.tgt_in, probe.src_ext)
        kl = (p_teacher.exp() * (p_teacher - p_student)).sum(-1)
        return float(kl[real].mean())

    before = kl_to_teacher()
    for epoch in range(2):
        for batch in t.epoch_batches(epoch):
            t.train_step(batch)
    assert t.teacher.computed_rows == len(t.pairs)  # epoch 2 reused epoch 1's targets
    assert kl_to_teacher() < 0.5 * before


def test_kd_weight_zero_is_plain_training_and_resume_keeps_the_next_loss(tmp_path: Path, teachers: list[Path]) -> None:
    plain = student(tmp_path / "plain", "model.dropout=0.3")
    plain_loss = plain.train_step(next(iter(plain.epoch_batches(0))))[0]
    zero = student(tmp_path / "zero", "model.dropout=0.3", f"train.teacher={teachers[0]}", "train.kd_weight=0")
    assert zero.train_step(next(iter(zero.epoch_batches(0))))[0] == pytest.approx(plain_loss, abs=1e-6)

    extra = (f"train.teacher={teachers[0]},{teachers[1]}", "model.dropout=0.3")
    (tmp_path / "kd").mkdir()
    a = student(tmp_path / "kd", *extra)
    stream = iter(a.epoch_batches(0))
    for i in range(4):
        a.train_step(next(stream))
        a.state["batch_in_epoch"] = i + 1
    a.save("last.pt")
    continued = a.train_step(next(stream))[0]
    b = student(tmp_path / "kd", *extra)  # a fresh process: the teacher's cache is empty
    assert b.resume()
    rest = iter(b.epoch_batches(0))
    for _ in range(4):
        next(rest)
    assert b.train_step(next(rest))[0] == pytest.approx(continued, abs=1e-6)


def test_teachers_that_do_not_fit_are_refused_in_one_line(
    tmp_path: Path, teachers: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    Trainer(load_config(None, [*TINY, "train.max_steps=1", "data.tgt_tokenizer=char"]), other).run(progress=False)

    def refused(*overrides: str) -> str:
        return train_refused(tmp_path / "run", capsys, *overrides)

    assert "different target tokenizer or vocabulary" in refused(f"train.teacher={other / 'last.pt'}")
    assert "absent.pt not found" in refused(f"train.teacher={teachers[0]},{tmp_path / 'absent.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_text("junk")
    assert "not a readable seqserve checkpoint" in refused(f"train.teacher={junk}")
    assert "not a readable seqserve checkpoint" in refused(f"train.init_from={junk}")
    copy = tmp_path / "copy"
    Trainer(load_config(None, [*TINY, "train.max_steps=1", "model.copy=true", "data.shared_vocab=true"]), copy).run(
        progress=False
    )
    assert "is a copy model and the student is not" in refused(
        f"train.teacher={copy / 'last.pt'}", "data.shared_vocab=true"
    )
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(ConfigError, match=r"train\.kd_weight must be in \[0, 1\]"):
        load_config(None, ["train.kd_weight=1.5"])
    with pytest.raises(ConfigError, match=r"train\.kd_top_k must be >= 1"):
        load_config(None, ["train.kd_top_k=0"])
