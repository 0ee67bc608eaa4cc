"""Serving benchmarks for BENCHMARKS.md, measured side by side in one run.

    python -m bench.serving --model-repository models --model g2p-en --out bench/results/serving.json

1. throughput: closed loop, 64 concurrent clients vs one client at a time (beam 5, one word per request);
2. step-level vs request-level batching under open-loop (Poisson) load at 70 % of the measured saturation,
   mixed source lengths: latency percentiles at equal offered load;
3. idle latency: one request at a time vs the bare onnxruntime cost of that request's encoder and
   decoder-step calls (same session options, same shapes, same number of steps).

The server runs as a separate process (`seqserve serve`), the load generator here, both on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from service.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def per_bundle_main(
    description: str,
    out_name: str,
    words: int,
    add_args: Callable[[argparse.ArgumentParser], None],
    measure: Callable[[Path, list[str], argparse.Namespace], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
) -> int:
    """The command line of an offline per-bundle benchmark (bench.batching_gain, bench.rescoring): the same CMUdict
    test words for every bundle given, one line printed per bundle, one JSON record written."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("bundles", type=Path, nargs="+", help="bundle directories REPO/NAME/VERSION")
    p.add_argument("--words", type=int, default=words, help="CMUdict test words")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / out_name)
    add_args(p)
    args = p.parse_args()
    test = test_words(args.words, args.seed)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results = []
    for bundle_dir in args.bundles:
        results.append(measure(bundle_dir, test, args))
        print(describe(results[-1]), flush=True)
    write_result(args.out, started, args.beam, {"words": args.words, "results": results})
    return 0


def write_result(out: Path, started: str, beam: int, body: dict[str, Any]) -> None:
    """A benchmark's JSON record: when it started, on what machine, at which beam, then ``body``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"started": started, "machine": platform.processor() or platform.machine(), "beam": beam}
    out.write_text(json.dumps(record | body, indent=2) + "\n")


def test_words(limit: int, seed: int) -> list[str]:
    from training.data import read_cmudict

    words = [ex.src for ex in read_cmudict()["test"]]
    random.Random(seed).shuffle(words)
    return words[:limit]


class ServerProcess:
    def __init__(
        self,
        repo: Path,
        batching: str,
        threads: int,
        extra: list[str],
        workers: int = 1,
        cpus: str = "",
        setup: str = "",
    ) -> None:
        """``setup``: Python run in the server process before it starts (e.g. setting a module constant)."""
        self.port = free_port()
        args = [
            "serve",
            "--model-repository",
            str(repo),
            "--grpc-port",
            str(self.port),
            "--metrics-port",
            "-1",
            "--batching",
            batching,
            "--threads",
            str(threads),
            "--poll-interval",
            "0",
            "--workers",
            str(workers),
            "--log-level",
            "WARNING",
            *extra,
        ]
        if setup:
            code = f"{setup}\nfrom service.cli import main\nraise SystemExit(main({args!r}))"
            args = [sys.executable, "-c", code]
        else:
            args = [sys.executable, "-m", "service.cli", *args]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}"}
        if cpus:  # pin the server away from the load generator
            args = ["taskset", "-c", cpus, *args]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env)
        self.target = f"127.0.0.1:{self.port}"

    def wait_ready(self, model: str) -> None:
        end = time.monotonic() + 120
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.Seq2SeqStub(channel)
            while time.monotonic() < end:
                try:
                    stub.Translate(pb.TranslateRequest(model=model, sources=["warmup"]), timeout=5)
                    return
                except grpc.RpcError:
                    time.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def closed_loop(
    target: str, model: str, words: list[str], clients: int, beam: int, no_rescoring: bool = False
) -> dict[str, float]:
    """``clients`` concurrent callers, each sending the next word as soon as its previous answer came back."""
    latencies: list[float] = []
    queue = list(reversed(words))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.Seq2SeqStub(channel)
        opts = pb.DecodingOptions(beam_size=beam, no_rescoring=no_rescoring)

        async def client() -> None:
            while queue:
                word = queue.pop()
                t0 = time.perf_counter()
                await stub.Translate(pb.TranslateRequest(model=model, sources=[word], options=opts), timeout=120)
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    return {
        "words": len(words),
        "seconds": wall,
        "words_per_s": len(words) / wall,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


async def open_loop(target: str, model: str, words: list[str], rate: float, beam: int, seed: int) -> dict[str, float]:
    """Poisson arrivals at ``rate`` requests/s regardless of answers (latency includes queueing)."""
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.Seq2SeqStub(channel)
        opts = pb.DecodingOptions(beam_size=beam)

        async def one(word: str) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                await stub.Translate(pb.TranslateRequest(model=model, sources=[word], options=opts), timeout=120)
                latencies.append(time.perf_counter() - t0)
            except grpc.RpcError:
                errors += 1

        tasks = []
        start = time.perf_counter()
        next_at = start
        for word in words:
            next_at += rng.expovariate(rate)
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(word)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "offered_per_s": rate,
        "completed_per_s": len(latencies) / wall,
        "errors": errors,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(lat.mean()),
    }


def bare_onnxruntime_cost(bundle: Bundle, words: list[str], beam: int) -> list[float]:
    """Per word: seconds of the encoder call plus the decoder-step calls its beam search makes, nothing else."""
    from service.engine.batch import decode_all
    from service.engine.beam import SearchOptions

    rt = bundle.runtime
    opts = SearchOptions(beam_size=beam, n_best=1, max_len=bundle.manifest.default_max_length)
    costs = []
    for word in words:
        job = bundle.make_job(word, opts, 10_000)
        steps = decode_all(rt, [job])[0].search.t  # how many decoder steps this word takes
        src = np.array([job.src_ids], dtype=np.int64)
        src_len = np.array([len(job.src_ids)], dtype=np.int64)
        rows = np.zeros(beam, dtype=np.int64)
        best = float("inf")
        for _ in range(3):  # best of 3: the bare cost, without scheduling noise
            t0 = time.perf_counter()
            memory, states = rt.encode(src, src_len)
            memory, states = memory[rows], [s[:, rows] for s in states]
            feed = rt.initial_feed(beam)
            tokens = np.full(beam, bundle.bos, dtype=np.int64)
            lens = src_len[rows]
            for t in range(steps):
                out = rt.step(tokens, states, feed, memory, lens, np.full(beam, t, dtype=np.int64))
                states, feed = out.states, out.feed
            best = min(best, time.perf_counter() - t0)
        costs.append(best)
    return costs


def _median_run(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def batched_cost_per_word(bundle: Bundle, words: list[str], beam: int) -> float:
    """Seconds per word when the engine's own search decodes them offline, 64 words per batch, best of 2.

    No gRPC, no threads, no waiting: what one worker can do at best, so 1-client latency divided by this
    bounds the throughput gain that batching can give on this machine.
    """
    from service.engine.batch import decode_all
    from service.engine.beam import SearchOptions

    opts = SearchOptions(beam_size=beam, n_best=1, max_len=bundle.manifest.default_max_length)
    best = float("inf")
    for _ in range(2):
        jobs = [bundle.make_job(w, opts, 10_000) for w in words]
        t0 = time.perf_counter()
        decode_all(bundle.runtime, jobs, max_rows=64 * beam, pad_id=bundle.pad)
        best = min(best, time.perf_counter() - t0)
    return best / len(words)


async def idle_latency(target: str, model: str, words: list[str], beam: int) -> list[float]:
    out = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.Seq2SeqStub(channel)
        opts = pb.DecodingOptions(beam_size=beam)
        for word in words:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                await stub.Translate(pb.TranslateRequest(model=model, sources=[word], options=opts), timeout=60)
                best = min(best, time.perf_counter() - t0)
            out.append(best)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="g2p-en")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument(
        "--sources",
        choices=("cmudict", "reverse"),
        default="cmudict",
        help="CMUdict test words (the G2P model), or random strings for bench.reverse_model's model",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="engines per model version (seqserve serve --workers)")
    p.add_argument("--pin", action="store_true", help="server on CPU 0, load generator on CPU 1 (2-core machines)")
    p.add_argument("--single-words", type=int, default=150, help="words for the one-client-at-a-time run")
    p.add_argument("--concurrent-words", type=int, default=2000, help="words for the 64-client run")
    p.add_argument("--throughput-repeats", type=int, default=3, help="alternating 1-client / 64-client runs")
    p.add_argument("--open-loop-seconds", type=float, default=20.0)
    p.add_argument("--open-loop-repeats", type=int, default=5, help="alternating runs per batching mode")
    p.add_argument(
        "--open-loop-other-encoder-mode",
        action="store_true",
        help="also run step batching with the encoder thread switched the other way, alternating with the rest",
    )
    p.add_argument("--idle-words", type=int, default=60)
    p.add_argument("--request-max-batch", type=int, default=64)
    p.add_argument("--step-join-wait-ms", type=float, default=0.0, help="seqserve serve --join-wait-ms for step mode")
    p.add_argument(
        "--step-encoder-thread",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="seqserve serve --encoder-thread / --no-encoder-thread for step mode",
    )
    p.add_argument("--request-max-wait-ms", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    if args.sources == "reverse":  # strings of 2-60 characters for bench.reverse_model's model
        from bench.reverse_model import random_sources

        words = random_sources(20_000, 10_000 + args.seed)
    else:
        words = test_words(20_000, args.seed)
    server_cpus = ""
    if args.pin:
        os.sched_setaffinity(0, {1})
        server_cpus = "0"
    versions = sorted(int(v.name) for v in (args.model_repository / args.model).iterdir() if v.name.isdigit())
    bundle_dir = args.model_repository / args.model / str(versions[-1])
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": f"{args.model}/{versions[-1]}",
        "beam": args.beam,
        "threads": args.threads,
        "workers": args.workers,
        "pinned": args.pin,
        "step_join_wait_ms": args.step_join_wait_ms,
        "step_encoder_thread": args.step_encoder_thread,
        "sources": args.sources,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }

    # 1 + 3: step-level server
    step_extra = ["--join-wait-ms", str(args.step_join_wait_ms), "--max-batch", str(args.request_max_batch)]
    step_extra.append("--encoder-thread" if args.step_encoder_thread else "--no-encoder-thread")
    server = ServerProcess(args.model_repository, "step", args.threads, step_extra, args.workers, server_cpus)
    try:
        server.wait_ready(args.model)
        ones, manys = [], []
        for _ in range(args.throughput_repeats):  # alternate: the machine's speed drifts between runs
            ones.append(asyncio.run(closed_loop(server.target, args.model, words[: args.single_words], 1, args.beam)))
            manys.append(
                asyncio.run(closed_loop(server.target, args.model, words[: args.concurrent_words], 64, args.beam))
            )
            print(
                f"throughput: 1 client {ones[-1]['words_per_s']:.1f} words/s, 64 clients "
                f"{manys[-1]['words_per_s']:.1f} words/s",
                flush=True,
            )
        one, many = _median_run(ones, "words_per_s"), _median_run(manys, "words_per_s")
        ratios = [m["words_per_s"] / o["words_per_s"] for o, m in zip(ones, manys, strict=True)]
        results["throughput"] = {
            "one_client": one,
            "64_clients": many,
            "runs": {"one_client": ones, "64_clients": manys},
            "ratio_per_repeat": ratios,
            "ratio": statistics.median(ratios),
        }
        print(
            f"throughput: median 1 client {one['words_per_s']:.1f} words/s, 64 clients {many['words_per_s']:.1f} "
            f"words/s; ratio per repeat {', '.join(f'{r:.2f}' for r in ratios)}, median "
            f"{results['throughput']['ratio']:.2f}x",
            flush=True,
        )
        idle_words = words[: args.idle_words]
        served = asyncio.run(idle_latency(server.target, args.model, idle_words, args.beam))
    finally:
        server.stop()
    bundle = Bundle(bundle_dir, threads=args.threads)  # the same session options as the server's
    bare = bare_onnxruntime_cost(bundle, idle_words, args.beam)
    batched = batched_cost_per_word(bundle, words[: args.concurrent_words], args.beam)
    results["throughput"]["batched_cost_ms_per_word"] = 1000 * batched
    results["throughput"]["ceiling_ratio"] = (one["seconds"] / one["words"]) / batched
    print(
        f"throughput ceiling: {1000 * batched:.2f} ms per word decoded offline in batches of 64 words "
        f"(no gRPC, one thread) -> 64-client/1-client ratio at most {results['throughput']['ceiling_ratio']:.2f}x",
        flush=True,
    )
    ratios = [s / b for s, b in zip(served, bare, strict=True)]
    results["idle_latency"] = {
        "words": len(idle_words),
        "served_median_ms": 1000 * statistics.median(served),
        "bare_onnxruntime_median_ms": 1000 * statistics.median(bare),
        "median_ratio": statistics.median(ratios),
        "ratio_of_medians": statistics.median(served) / statistics.median(bare),
    }
    print(
        f"idle latency: served {results['idle_latency']['served_median_ms']:.2f} ms vs bare "
        f"{results['idle_latency']['bare_onnxruntime_median_ms']:.2f} ms, median ratio "
        f"{results['idle_latency']['median_ratio']:.3f}",
        flush=True,
    )

    # 2: saturation of each mode (64 closed-loop clients), then open loop at 70 % of the lower one, so that
    #    both modes complete the same throughput; same arrival times and words for both
    request_extra = ["--max-batch", str(args.request_max_batch), "--max-wait-ms", str(args.request_max_wait_ms)]
    server = ServerProcess(args.model_repository, "request", args.threads, request_extra, args.workers, server_cpus)
    try:
        server.wait_ready(args.model)
        sat_request = asyncio.run(closed_loop(server.target, args.model, words[: args.concurrent_words], 64, args.beam))
    finally:
        server.stop()
    saturation = {"step": many["words_per_s"], "request": sat_request["words_per_s"]}
    rate = 0.7 * min(saturation.values())
    n = int(rate * args.open_loop_seconds)
    mixed = words[args.concurrent_words : args.concurrent_words + n]
    results["open_loop"] = {
        "saturation_per_s": saturation,
        "rate_per_s": rate,
        "requests": n,
        "source_length": {
            "min": min(map(len, mixed)),
            "max": max(map(len, mixed)),
            "mean": statistics.mean(map(len, mixed)),
        },
    }
    print(
        f"saturation: step {saturation['step']:.1f}/s, request {saturation['request']:.1f}/s; "
        f"open loop at {rate:.1f}/s",
        flush=True,
    )
    # alternate the modes and repeat: single runs of p99 on this shared 2-core machine swing by 1.5x
    modes: list[tuple[str, str, list[str]]] = [("step", "step", step_extra), ("request", "request", request_extra)]
    if args.open_loop_other_encoder_mode:  # step batching with the encoder thread switched the other way
        other = [*step_extra[:-1], "--no-encoder-thread" if args.step_encoder_thread else "--encoder-thread"]
        name = "step_no_encoder_thread" if args.step_encoder_thread else "step_encoder_thread"
        modes.insert(1, (name, "step", other))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in modes}
    for repeat in range(args.open_loop_repeats):
        for name, batching, extra in modes:
            server = ServerProcess(args.model_repository, batching, args.threads, extra, args.workers, server_cpus)
            try:
                server.wait_ready(args.model)
                r = asyncio.run(open_loop(server.target, args.model, mixed, rate, args.beam, args.seed + repeat))
            finally:
                server.stop()
            runs[name].append(r)
            print(
                f"open loop {name} #{repeat + 1}: {r['completed_per_s']:.1f}/s completed, "
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms",
                flush=True,
            )
    for batching, rs in runs.items():
        results["open_loop"][batching] = {
            "runs": rs,
            **{k: statistics.median(r[k] for r in rs) for k in ("completed_per_s", "p50_ms", "p90_ms", "p99_ms")},
        }
    ol = results["open_loop"]
    ol["p99_ratio_request_over_step"] = ol["request"]["p99_ms"] / ol["step"]["p99_ms"]
    ol["p99_ratio_per_repeat"] = [r["p99_ms"] / s["p99_ms"] for s, r in zip(runs["step"], runs["request"], strict=True)]
    print(
        f"open loop p99 request/step: median {ol['p99_ratio_request_over_step']:.2f}, per repeat "
        + ", ".join(f"{x:.2f}" for x in ol["p99_ratio_per_repeat"]),
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
