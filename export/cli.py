"""``seqserve export CHECKPOINT --out REPO/NAME/VERSION``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training.cli import non_negative_int, positive_int
from training.config import COMBINE


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        type=Path,
        nargs="+",
        help="a training checkpoint (best.pt); several make an ensemble in one bundle (same tokenizers)",
    )
    p.add_argument(
        "--combine",
        choices=COMBINE,
        default="prob",
        help="ensembles: average the members' probabilities (prob) or log-probabilities (logprob)",
    )
    p.add_argument("--out", type=Path, required=True, help="bundle directory REPO/NAME/VERSION (VERSION: an integer)")
    p.add_argument("--quantize", choices=("int8",), help="write an int8 (dynamic quantization) bundle instead of fp32")
    p.add_argument("--optimize", action="store_true", help="apply onnxruntime's offline graph optimisation")
    p.add_argument(
        "--parity-limit", type=non_negative_int, default=0, help="check parity on the first N dev inputs (0: all)"
    )
    p.add_argument(
        "--beam", type=positive_int, default=5, help="beam of the n-best parity check (and of the rescoring tuning)"
    )
    p.add_argument(
        "--graphone",
        type=Path,
        help="a graphone n-gram (seqserve graphone) that re-ranks the beam's n-best; its weights are tuned on dev",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--no-progress", action="store_true")


def run_export(args: argparse.Namespace) -> int:
    from export.onnx_export import ExportError
    from export.pipeline import ExportOptions, export_checkpoint
    from service.runtime.manifest import version_number

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("export").setLevel(logging.INFO)  # our progress; onnxruntime's quantizer stays quiet
    version = version_number(args.out.name)  # the server's rule
    if version is None:
        print(
            f"seqserve export: --out must end in a positive integer version directory, got {args.out}", file=sys.stderr
        )
        return 2
    missing = [str(p) for p in [*args.checkpoint, *([args.graphone] if args.graphone else [])] if not p.is_file()]
    if missing:
        print(f"seqserve export: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:  # before minutes of exporting: the model directory must be creatable
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"seqserve export: cannot create {args.out.parent}: {exc.strerror}", file=sys.stderr)
        return 2
    opts = ExportOptions(
        name=args.out.parent.name,
        version=version,
        quantize=args.quantize or "",
        optimize=args.optimize,
        parity_limit=args.parity_limit,
        beam=args.beam,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        combine=args.combine,
        graphone=args.graphone,
    )
    try:
        manifest = export_checkpoint(args.checkpoint, args.out, opts)
    except ExportError as exc:
        print(f"seqserve export: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the disk filled up while writing
        print(f"seqserve export: cannot write {exc.filename or args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    summary = {"bundle": str(args.out), "parity": {k: v for k, v in manifest.parity.items() if k != "mismatches"}}
    if manifest.quantization:
        summary["quantization"] = manifest.quantization
    if manifest.rescoring:
        tuning = manifest.rescoring["tuning"]
        summary["rescoring"] = {
            "weight": manifest.rescoring["weight"],
            "length_weight": manifest.rescoring["length_weight"],
            f"dev_{tuning['metric']}": [tuning["before"][tuning["metric"]], tuning["after"][tuning["metric"]]],
        }
    print(json.dumps(summary, indent=2))
    return 0


def add_recover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="an fp32 bundle directory REPO/NAME/VERSION (e.g. models/g2p-en/2)")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write (e.g. runs/g2p-en-2.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


def run_recover(args: argparse.Namespace) -> int:
    """A training checkpoint from a bundle's graphs (to fine-tune, ensemble, distill from or re-export it)."""
    from export.onnx_export import ExportError
    from export.recover import recover
    from training.train import save_checkpoint

    if not args.bundle.is_dir():
        print(f"seqserve recover: not a bundle directory: {args.bundle}", file=sys.stderr)
        return 2
    if args.out.exists() and not args.overwrite:
        print(f"seqserve recover: {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        ckpt = recover(args.bundle)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ckpt, args.out)
    except ExportError as exc:
        print(f"seqserve recover: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"seqserve recover: cannot write {exc.filename or args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    params = sum(t.numel() for t in ckpt["model"].values())
    print(
        f"seqserve recover: {ckpt['recovered_from']['bundle']} -> {args.out} ({params:,} weights; the re-exported"
        " graphs equal the bundle's bit for bit)"
    )
    return 0
