"""Ensembles: the combined step is the members' mixture, states stay with their member, bad combinations refused."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.test_training import ROOT, TINY
from training.cli import main
from training.config import ModelConfig, load_config
from training.decode import beam_search
from training.ensemble import Ensemble, EnsembleError, check_compatible
from training.model import Seq2Seq
from training.train import Trainer

SRC_V, TGT_V = 12, 9


def model(seed: int, **changes: Any) -> Seq2Seq:
    torch.manual_seed(seed)
    cfg = replace(
        ModelConfig(emb_size=8, enc_hidden=8, enc_layers=1, dec_hidden=16, dec_layers=1, attn_hidden=8), **changes
    )
    return Seq2Seq(cfg, SRC_V, TGT_V).eval()


def inputs(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    src = torch.randint(4, SRC_V, (n, 6))
    src_len = torch.tensor([6, 4, 2][:n])
    src[1, 4:] = 0
    src[2, 2:] = 0
    return src, src_len


@torch.no_grad()
@pytest.mark.parametrize("combine", ["prob", "logprob"])
def test_step_mixes_the_members_and_each_keeps_its_states(combine: str) -> None:
    a = model(1)
    b = model(2, cell="gru", dec_hidden=24, dec_layers=2, attention="concat", reverse_source=True)
    ens = Ensemble([a, b], combine)
    assert ens.state_names == ("m0_h", "m0_c", "m1_h") and ens.feed_size == 16 + 24
    src, src_len = inputs()
    memory, states = ens.encode(src, src_len)
    mem_a, st_a = a.encode(src, src_len)
    mem_b, st_b = b.encode(src, src_len)
    torch.testing.assert_close(memory, torch.cat([mem_a, mem_b], dim=-1))
    feed_a, feed_b = torch.zeros(3, 16), torch.zeros(3, 24)
    feed = torch.zeros(3, 40)
    tokens, step = torch.tensor([1, 5, 7]), torch.zeros(3, dtype=torch.long)
    for _ in range(3):  # a few steps: states and feeds must keep following their member
        lp, states, feed, attn, _ = ens.step(tokens, states, feed, memory, src_len, step)
        lp_a, st_a, feed_a, w_a, _ = a.step(tokens, st_a, feed_a, mem_a, src_len, step)
        lp_b, st_b, feed_b, w_b, _ = b.step(tokens, st_b, feed_b, mem_b, src_len, step)
        if combine == "prob":
            want = torch.log((lp_a.exp() + lp_b.exp()) / 2)
        else:
            want = torch.log_softmax((lp_a + lp_b) / 2, dim=-1)
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)  # a distribution
        for got, expected in zip(states, [*st_a, *st_b], strict=True):
            torch.testing.assert_close(got, expected)
        torch.testing.assert_close(feed, torch.cat([feed_a, feed_b], dim=-1))
        torch.testing.assert_close(attn, (w_a + w_b) / 2)
        tokens, step = lp.argmax(-1), step + 1


@torch.no_grad()
def test_an_ensemble_of_one_model_twice_decodes_like_the_model() -> None:
    a = model(3)
    src, src_len = inputs()
    alone = beam_search(a, src, src_len, beam=3, n_best=3, max_len=8)
    twice = beam_search(Ensemble([a, a]), src, src_len, beam=3, n_best=3, max_len=8)
    for x, y in zip(alone, twice, strict=True):
        assert [h.tokens for h in x] == [h.tokens for h in y]
        assert all(math.isclose(h.log_prob, g.log_prob, abs_tol=1e-4) for h, g in zip(x, y, strict=True))


def test_incompatible_members_are_refused() -> None:
    with pytest.raises(EnsembleError, match="at least two"):
        Ensemble([model(1)])
    with pytest.raises(EnsembleError, match="copy"):
        Ensemble([model(1), model(2, copy=True)])
    with pytest.raises(EnsembleError, match="combine"):
        Ensemble([model(1), model(2)], "max")
    torch.manual_seed(0)
    with pytest.raises(EnsembleError, match="vocabulary sizes"):
        Ensemble([model(1), Seq2Seq(model(2).cfg, SRC_V, TGT_V + 1)])


def checkpoint(tgt_vocab: list[str], max_tgt_len: int = 40, sp: bytes | None = None) -> dict[str, Any]:
    spec = {"kind": "sentencepiece" if sp else "word", "vocab": "tgt.vocab", "lowercase": False}
    if sp:
        spec["model"] = "tgt.model"
    return {
        "tokenizers": {"src": {"kind": "char", "vocab": "src.vocab"}, "tgt": spec},
        "vocabs": {"src": ["<pad>", "<s>", "</s>", "<unk>", "a"], "tgt": tgt_vocab},
        "files": {"tgt.model": sp} if sp else {},
        "config": {"data": {"max_src_len": 100, "max_tgt_len": max_tgt_len}},
    }


def test_members_must_tokenize_identically() -> None:
    base = ["<pad>", "<s>", "</s>", "<unk>", "AH0", "B"]
    check_compatible([checkpoint(base), checkpoint(list(base))], ["a.pt", "b.pt"])
    with pytest.raises(EnsembleError, match=r"b\.pt has a different target tokenizer or vocabulary than a\.pt"):
        check_compatible([checkpoint(base), checkpoint([*base[:4], "B", "AH0"])], ["a.pt", "b.pt"])
    with pytest.raises(EnsembleError, match="max_tgt_len"):
        check_compatible([checkpoint(base), checkpoint(base, max_tgt_len=50)], ["a.pt", "b.pt"])
    with pytest.raises(EnsembleError, match="SentencePiece model"):
        check_compatible([checkpoint(base, sp=b"one"), checkpoint(base, sp=b"two")], ["a.pt", "b.pt"])


def test_eval_decodes_several_checkpoints_as_an_ensemble(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    Trainer(load_config(None, [*TINY, "train.max_steps=2"]), run).run(resume=False, progress=False)
    ckpt = str(run / "last.pt")
    capsys.readouterr()  # the training run's own output
    data = str(reversal_pairs(tmp_path / "dev.tsv"))
    argv = ["eval", ckpt, ckpt, "--data", data, "--limit", "20", "--beam", "2", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == f"{ckpt} + {ckpt}" and result["words"] == 20 and 0.0 <= result["wer"] <= 1.0
    assert result["split"] == data
    assert 0.0 < result["confidence"] <= 1.0 and 0.0 <= result["ece"] <= 1.0
    assert main(["eval", ckpt, "--data", data, "--limit", "20", "--beam", "2"]) == 0
    assert "expected calibration error" in capsys.readouterr().out
    # a model of another data set is not scored against CMUdict by default (that gave meaningless figures)
    assert main(["eval", ckpt, "--split", "dev", "--limit", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqserve eval: the model was trained on 'reverse' data, not CMUdict: give its dev")
    assert main(["eval", ckpt, str(ROOT / "models" / "g2p-en" / "2")]) == 2
    assert "one bundle directory, or one or more checkpoints" in capsys.readouterr().err
    assert main(["eval", ckpt, str(ROOT / "README.md")]) == 2
    assert "README.md: not a readable seqserve checkpoint" in capsys.readouterr().err
    torch.save([1, 2], tmp_path / "list.pt")  # a torch file, but not a checkpoint
    assert main(["eval", str(tmp_path / "list.pt")]) == 2
    assert "list.pt: not a seqserve checkpoint (format 'list')" in capsys.readouterr().err


def reversal_pairs(path: Path, n: int = 30) -> Path:
    """A reversal task's dev file (what the TINY models learn): ``abc<TAB>c b a`` lines."""
    words = [
        "".join("abcdefghij"[(i >> (2 * j)) % 10] for j in range(3 + i % 3)) + "abcdefghij"[i % 10] for i in range(n)
    ]
    assert len(set(words)) == n
    path.write_text("".join(f"{w}\t{' '.join(reversed(w))}\n" for w in words))
    return path
