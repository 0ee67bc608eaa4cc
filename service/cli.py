"""The ``seqserve`` command: serve, translate, models (serving install); train, eval, export, recover (train extra)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from seqserve.v1 import seqserve_pb2 as pb


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, default=Path("models"), help="directory of <model>/<version>/")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=8000, help="Prometheus /metrics port (-1: off)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    p.add_argument("--workers", type=int, default=1, help="engines (sessions + thread) per model version")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--poll-interval", type=float, default=5.0, help="seconds between repository scans (0: off)")
    p.add_argument(
        "--batching",
        choices=("step", "request"),
        default="step",
        help="step: join/leave the batch at every decoder step; request: whole batches",
    )
    p.add_argument("--max-rows", type=int, default=1024, help="hypothesis rows per decoder step")
    p.add_argument("--max-queue", type=int, default=4096, help="sources waiting; beyond: RESOURCE_EXHAUSTED")
    p.add_argument("--max-queue-wait-ms", type=int, default=30_000, help="longest wait before joining a batch")
    p.add_argument("--max-batch", type=int, default=64, help="request batching: sources per batch")
    p.add_argument(
        "--join-wait-ms",
        type=float,
        default=0.0,
        help="step batching: newcomers to a running batch gather this long to be encoded together",
    )
    p.add_argument(
        "--encoder-thread",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="step batching: encode sources that join a running batch on a second thread, beside the decoder steps "
        "(default: on; --no-encoder-thread: the worker encodes them between steps)",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="request batching: time to collect a batch")
    p.add_argument("--max-sources", type=int, default=256, help="sources per request")
    p.add_argument("--max-source-length", type=int, default=256, help="source tokens")
    p.add_argument("--max-output-length", type=int, default=512, help="output tokens")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to finish running requests on SIGTERM")
    p.add_argument("--log-level", default="INFO")


def _run_serve(args: argparse.Namespace) -> int:
    from service.api.convert import Limits
    from service.engine.scheduler import EngineSettings
    from service.server import ServerSettings, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = EngineSettings(
        batching=args.batching,
        max_rows=args.max_rows,
        max_queue=args.max_queue,
        max_queue_wait_ms=args.max_queue_wait_ms,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        workers=args.workers,
        join_wait_ms=args.join_wait_ms,
        encoder_thread=args.encoder_thread,
    )
    settings = ServerSettings(
        model_repository=args.model_repository,
        host=args.host,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        threads=args.threads,
        device=args.device,
        poll_interval_s=args.poll_interval,
        grace_s=args.grace,
        engine=engine,
        limits=Limits(
            max_sources=args.max_sources,
            max_source_length=args.max_source_length,
            max_output_length=args.max_output_length,
        ),
    )
    try:
        settings.validate()
    except ValueError as exc:
        print(f"seqserve serve: {exc}", file=sys.stderr)
        return 2
    if not args.model_repository.is_dir():
        print(f"seqserve serve: model repository {args.model_repository} is not a directory", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(settings))
    except OSError as exc:
        print(f"seqserve serve: {exc}", file=sys.stderr)
        return 1


def _translate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", help="source strings (default: one per line on standard input)")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int, default=0, help="0: the highest ready version")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--n-best", type=int, default=1)
    p.add_argument("--max-length", type=int, default=0)
    p.add_argument(
        "--no-rescoring", action="store_true", help="rank by the model's score alone (bundles with a rescorer)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--batch-size", type=int, default=64, help="inputs per request (the server's limit is 256)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--json", action="store_true", help="print the full response as JSON")


def _run_translate(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from service.client import BatchTranslator, Client, InputError, RequestFailed

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin]
    if not any(text.strip() for text in texts):
        print("seqserve translate: no input text", file=sys.stderr)
        return 2
    refused = 0
    translations: list[dict[str, Any]] = []
    status = 0
    with Client(args.server, args.timeout) as client:
        try:
            batcher = BatchTranslator(
                client,
                args.model,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                version=args.version,
                beam_size=args.beam,
                num_hypotheses=args.n_best,
                max_length=args.max_length,
                no_rescoring=args.no_rescoring,
            )
        except ValueError as exc:
            print(f"seqserve translate: {exc}", file=sys.stderr)
            return 2
        try:
            for i, result in enumerate(batcher.translate(texts)):
                if result is None or isinstance(result, InputError):  # a blank or refused input: an empty line
                    if result is None:
                        translations.append({})
                    else:
                        refused += 1
                        print(f"seqserve translate: input {i + 1} {result.message} ({result.code})", file=sys.stderr)
                        translations.append({"error": {"code": result.code, "message": result.message}})
                    if not args.json and args.n_best == 1:
                        print()  # so the output lines still align with the input lines
                    continue
                if result.unknown_source_positions:  # stdout keeps one answer per line; warnings go to stderr
                    unknown = ", ".join(repr(result.source_tokens[p]) for p in result.unknown_source_positions)
                    warning = f"input {i + 1} has tokens the model does not know: {unknown}"
                    print(f"seqserve translate: {warning}", file=sys.stderr)
                translations.append(MessageToDict(result, preserving_proto_field_name=True))
                if not args.json:
                    for h in result.hypotheses:
                        print(h.text if args.n_best == 1 else f"{h.score:.4f}\t{h.text}", flush=args.n_best == 1)
        except RequestFailed as exc:
            print(f"seqserve translate: {exc}", file=sys.stderr)
            status = 1
    if args.json:
        print(json.dumps({"model": args.model, "version": batcher.version, "translations": translations}, indent=2))
    if refused:
        print(f"seqserve translate: {refused} of {len(texts)} inputs refused (see above)", file=sys.stderr)
        status = status or 1
    return status


def _run_models(args: argparse.Namespace) -> int:
    from service.client import Client

    try:
        with Client(args.server, 10.0) as client:
            response = client.list_models()
    except grpc.RpcError as exc:
        print(f"seqserve models: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    for m in response.models:
        state = pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_")
        detail = (m.architecture + (" (int8)" if m.quantized else "")) if m.architecture else m.reason
        print(f"{m.name}\t{m.version}\t{state}\t{detail}")
    return 0


def _torch_side(module: str, func: str, args: argparse.Namespace) -> int:
    """train / eval / export live in the train extra; torch is imported only when one of them runs."""
    missing = [name for name in ("torch", "onnx", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"seqserve {args.command}: needs the training extra: pip install 'seqserve[train]' "
            f"(missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return 2
    # torch's C++ warnings (the TorchScript exporter prints six shape-inference notes per export) are not the user's
    # business; an explicit TORCH_CPP_LOG_LEVEL still wins. Set before torch is first imported, which is below.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    result: int = getattr(importlib.import_module(module), func)(args)
    return result


def build_parser() -> argparse.ArgumentParser:
    from export.cli import add_export_args, add_recover_args
    from training.cli import (
        add_average_args,
        add_calibrate_args,
        add_distill_args,
        add_eval_args,
        add_graphone_args,
        add_train_args,
    )

    parser = argparse.ArgumentParser(prog="seqserve", description="Serve recurrent seq2seq models over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_args(sub.add_parser("serve", help="run the gRPC server"))
    _translate_args(sub.add_parser("translate", help="call a server's Translate"))
    models = sub.add_parser("models", help="list a server's models")
    models.add_argument("--server", default="127.0.0.1:50051")
    add_train_args(sub.add_parser("train", help="train a model (needs seqserve[train])"))
    add_eval_args(sub.add_parser("eval", help="score a checkpoint on the CMUdict test split (needs seqserve[train])"))
    add_average_args(
        sub.add_parser("average", help="average checkpoints' weights into one checkpoint (needs seqserve[train])")
    )
    add_distill_args(
        sub.add_parser("distill", help="write a teacher's outputs for the training split (needs seqserve[train])")
    )
    add_calibrate_args(
        sub.add_parser(
            "calibrate", help="fit a temperature on the dev split for calibrated probabilities (needs seqserve[train])"
        )
    )
    add_graphone_args(
        sub.add_parser(
            "graphone", help="a graphone n-gram of a checkpoint's training split, to rescore n-best lists (train extra)"
        )
    )
    add_export_args(sub.add_parser("export", help="export a checkpoint to a bundle (needs seqserve[train])"))
    add_recover_args(
        sub.add_parser(
            "recover",
            help="a training checkpoint from an fp32 bundle, to fine-tune, ensemble or re-export it (train extra)",
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "translate":
        return _run_translate(args)
    if args.command == "models":
        return _run_models(args)
    torch_side = {
        "train": ("training.cli", "run_train"),
        "eval": ("training.cli", "run_eval"),
        "average": ("training.cli", "run_average"),
        "distill": ("training.cli", "run_distill"),
        "calibrate": ("training.cli", "run_calibrate"),
        "graphone": ("training.cli", "run_graphone"),
        "export": ("export.cli", "run_export"),
        "recover": ("export.cli", "run_recover"),
    }
    module, func = torch_side[args.command]
    return _torch_side(module, func, args)


if __name__ == "__main__":
    sys.exit(main())
