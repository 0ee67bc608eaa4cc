"""Graphone rescoring: `seqserve graphone`, tuning inside `seqserve export --graphone`, the served ranking."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from export.onnx_export import ExportError
from export.pipeline import ExportOptions, export_checkpoint
from export.rescoring import LENGTH_WEIGHTS, WEIGHTS
from service.cli import main
from service.engine.batch import decode_all
from service.engine.beam import SearchOptions
from service.runtime.bundle import Bundle
from service.runtime.graphone import GraphoneModel
from service.runtime.manifest import BundleError, read_manifest
from service.text import Tokenizer, TokenizerSpec, Vocab
from tests.training.test_ensemble import reversal_pairs
from training.data import Example, reverse_task
from training.graphone import lexicon


def test_graphone_command_writes_a_model(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "g" / "rev.npz"
    assert main(["graphone", str(tiny_checkpoint), "--out", str(out), "--order", "2"]) == 0
    model = GraphoneModel.load(out)
    assert model.order == 2 and model.size > len(model.tokens) > 10
    assert "pairs aligned" in capsys.readouterr().out
    # a training pair has a segmentation and a finite score
    word = reverse_task(5, 1)[0]
    assert model.score(list(word.src), word.refs[0].split()) is not None


def test_graphone_command_errors_are_one_line(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert main(["graphone", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "g.npz")]) == 2
    assert capsys.readouterr().err.strip() == f"seqserve graphone: not found: {tmp_path / 'nope.pt'}"
    args = ["graphone", str(tiny_checkpoint), "--out", str(tmp_path / "g.npz"), "--strip", "["]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("seqserve graphone: the strip pattern '[' is not a regular expression")


def test_lexicon_leaves_out_pairs_graphones_cannot_hold() -> None:
    char = Tokenizer(TokenizerSpec(kind="char", vocab="", lowercase=False), Vocab(["<pad>", "<s>", "</s>", "<unk>"]))
    word = Tokenizer(TokenizerSpec(kind="word", vocab=""), Vocab(["<pad>", "<s>", "</s>", "<unk>"]))
    examples = [
        Example("ab", ("AH0 B", "AH1 B")),  # two references, one after stripping stress
        Example("a_b", ("AH B",)),  # a reserved symbol
        Example("x", ("EH K S",)),  # three targets from one source token
    ]
    lines, skipped = lexicon(examples, char, word, strip="[0-9]")
    assert lines == ["a b\tAH B"] and skipped == 2
    lines, skipped = lexicon(examples[:1], char, word)
    assert lines == ["a b\tAH0 B", "a b\tAH1 B"] and skipped == 0


def test_export_tunes_the_rescorer_on_dev_and_never_makes_dev_worse(rescored_bundle: Path) -> None:
    manifest = read_manifest(rescored_bundle)
    r = manifest.rescoring
    assert r["file"] in manifest.files and (rescored_bundle / r["file"]).is_file()
    assert r["weight"] in WEIGHTS and r["length_weight"] in LENGTH_WEIGHTS
    tuning = r["tuning"]
    assert tuning["split"] == "dev" and tuning["examples"] > 50  # the whole dev split, not --parity-limit's 50
    assert tuning["after"][tuning["metric"]] <= tuning["before"][tuning["metric"]]
    assert "n-best rescored by a graphone 3-gram" in manifest.summary()


def test_served_ranking_is_the_rescored_score(rescored_bundle: Path) -> None:
    bundle = Bundle(rescored_bundle)
    assert bundle.rescorer is not None
    rescorer = bundle.rescorer
    words = [ex.src for ex in reverse_task(40, 7)]
    options = SearchOptions(beam_size=5, n_best=3, max_len=20)
    jobs = decode_all(bundle.runtime, [bundle.make_job(w, options, 100, tag=i) for i, w in enumerate(words)])
    jobs.sort(key=lambda j: j.tag)  # decode_all returns them as they finish
    for word, job in zip(words, jobs, strict=True):
        src = bundle.source_tokens(word)
        outs = bundle.outputs(job, src)
        plain = bundle.outputs(job, src, rescore=False)
        assert [o.tokens for o in plain] == [bundle.output(h, src, False).tokens for h in job.search.results()]
        every = [bundle.output(h, src, False) for h in job.search.finished]
        want = sorted(
            ((rescorer.rescore(o.score, src, o.tokens), i) for i, o in enumerate(every)), key=lambda p: (-p[0], p[1])
        )[:3]
        assert [o.tokens for o in outs] == [every[i].tokens for _, i in want]
        assert [o.score for o in outs] == pytest.approx([s for s, _ in want])
        assert [o.log_prob for o in outs] == [every[i].log_prob for _, i in want]  # the model's, unchanged
    greedy = bundle.make_job(words[0], SearchOptions(beam_size=1, max_len=20), 100)
    (done,) = decode_all(bundle.runtime, [greedy], pad_id=bundle.pad)
    assert bundle.outputs(done, bundle.source_tokens(words[0]))[0].score == done.search.results()[0].score


def test_bad_rescoring_entries_refuse_the_bundle(rescored_bundle: Path, tmp_path: Path) -> None:
    for change, message in (
        ({"weight": -1.0}, "rescoring needs finite weights"),
        ({"beam": "wide"}, "rescoring is malformed"),
    ):
        copy = tmp_path / f"b{len(message)}"
        shutil.copytree(rescored_bundle, copy)
        raw = json.loads((copy / "manifest.json").read_text())
        raw["rescoring"].update(change)
        (copy / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(BundleError, match=message):
            Bundle(copy)
    damaged = tmp_path / "damaged"
    shutil.copytree(rescored_bundle, damaged)
    (damaged / "graphone.npz").write_bytes(b"junk")
    with pytest.raises(BundleError, match=r"graphone\.npz is corrupted"):
        Bundle(damaged)


def test_a_bad_graphone_file_is_refused_before_any_export_work(tiny_checkpoint: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    target = tmp_path / "repo" / "m" / "1"
    with pytest.raises(ExportError, match="cannot read the graphone model"):
        export_checkpoint(tiny_checkpoint, target, ExportOptions(name="m", version=1, graphone=junk, progress=False))
    assert not target.exists()


def test_eval_reports_whether_the_bundle_rescored(rescored_bundle: Path, tmp_path: Path, capsys) -> None:
    args = ["eval", str(rescored_bundle), "--data", str(reversal_pairs(tmp_path / "dev.tsv")), "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rescored"] is True
    assert main([*args, "--no-rescoring"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rescored"] is False
    damaged = tmp_path / "damaged"
    shutil.copytree(rescored_bundle, damaged)
    (damaged / "graphone.npz").write_bytes(b"junk")
    assert main(["eval", str(damaged), "--data", str(tmp_path / "dev.tsv"), "--limit", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"seqserve eval: {damaged}: graphone.npz is corrupted: sha256 ") and "\n" not in err


def test_a_graphone_model_for_other_tokens_is_flagged(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.service.test_graphone import ARPA

    arpa = tmp_path / "other.arpa"
    arpa.write_text(ARPA, encoding="utf-8")  # graphones of letters and ARPAbet: nothing of the reversal task
    other = tmp_path / "other.npz"
    GraphoneModel.from_arpa(arpa).save(other)
    target = tmp_path / "repo" / "m" / "1"
    with caplog.at_level("WARNING", logger="export.rescoring"):
        manifest = export_checkpoint(
            tiny_checkpoint, target, ExportOptions(name="m", version=1, parity_limit=20, progress=False, graphone=other)
        )
    assert "cannot segment" in caplog.text
    tuning = manifest.rescoring["tuning"]
    assert tuning["unsegmented"] == tuning["hypotheses"]
    assert tuning["after"][tuning["metric"]] <= tuning["before"][tuning["metric"]]
