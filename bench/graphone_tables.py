"""The graphone n-gram's in-memory tables against an earlier implementation of them, side by side in one run.

    git worktree add /tmp/base 99c8fce     # the implementation to compare against
    python -m bench.graphone_tables --baseline /tmp/base/service/runtime/graphone.py

``service/runtime/graphone.py`` is self-contained (standard library and numpy), so the baseline file is imported
as a module of its own beside the current one. Both load the bundle's ``graphone.npz``:

1. load: seconds, and the memory the loaded model holds and peaks at while loading (tracemalloc), alternating;
2. scoring: the beam-5 n-best of CMUdict test words (decoded once with the bundle), every word's hypotheses scored
   by each implementation with its step cache emptied first, rounds alternating; the scores must be identical;
3. served: ``seqserve serve`` with the model repository (the baseline server imports the baseline file in place of
   the current one), VmRSS after one request to every model in it, one server at a time, alternating.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from bench.serving import ROOT, ServerProcess, test_words, write_result
from service.engine.batch import decode_all
from service.engine.beam import SearchOptions
from service.runtime import graphone
from service.runtime.bundle import Bundle


def load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_graphone", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def load_cost(module: ModuleType, path: Path) -> dict[str, float]:
    """Seconds to load (untraced: tracemalloc slows the allocations down) and the memory held and peaked at while
    loading (a second load, traced)."""
    gc.collect()
    start = time.perf_counter()
    model = module.GraphoneModel.load(path)
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    tracemalloc.start()
    try:
        model = module.GraphoneModel.load(path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del model
    return {"seconds": seconds, "held_mb": held / 2**20, "peak_mb": peak / 2**20}


def served_rss_mb(repo: Path, models: list[str], setup: str) -> float:
    server = ServerProcess(repo, "step", 1, [], setup=setup)
    try:
        server.wait_ready(models[0])
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.Seq2SeqStub(channel)
            for model in models:
                stub.Translate(pb.TranslateRequest(model=model, sources=["rescoring"]), timeout=30)
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--baseline", type=Path, required=True, help="an earlier service/runtime/graphone.py")
    p.add_argument("--bundle", type=Path, default=ROOT / "models" / "g2p-en" / "2")
    p.add_argument("--model-repository", type=Path, default=ROOT / "models", help="for the served memory")
    p.add_argument("--words", type=int, default=2000, help="CMUdict test words")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "graphone-tables.json")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    baseline = load_file(args.baseline.resolve())
    bundle = Bundle(args.bundle)
    if bundle.rescorer is None:
        raise SystemExit(f"{args.bundle} has no rescorer")
    npz = args.bundle / bundle.rescorer.spec.file
    viterbi_beam = bundle.rescorer.spec.beam
    implementations = {"baseline": baseline, "current": graphone}

    loads: dict[str, list[dict[str, float]]] = {name: [] for name in implementations}
    for r in range(args.rounds):
        for name in implementations if r % 2 == 0 else reversed(implementations):
            loads[name].append(load_cost(implementations[name], npz))

    words = test_words(args.words, 1)
    options = SearchOptions(beam_size=args.beam, n_best=args.beam, max_len=bundle.manifest.default_max_length)
    jobs = decode_all(
        bundle.runtime, [bundle.make_job(w, options, 10_000, tag=i) for i, w in enumerate(words)], pad_id=bundle.pad
    )
    jobs.sort(key=lambda j: j.tag)
    pairs = []
    for word, job in zip(words, jobs, strict=True):
        source = bundle.source_tokens(word)
        pairs.append((source, [bundle.output(h, source, False).tokens for h in job.search.finished]))
    models = {name: module.GraphoneModel.load(npz) for name, module in implementations.items()}
    seconds: dict[str, list[float]] = {name: [] for name in implementations}
    scores: dict[str, list[list[float | None]]] = {}
    for r in range(args.rounds):
        for name in implementations if r % 2 == 0 else reversed(implementations):
            model = models[name]
            model._steps.clear()
            start = time.perf_counter()
            scores[name] = [model.score_many(source, hyps, viterbi_beam) for source, hyps in pairs]
            seconds[name].append(time.perf_counter() - start)
    identical = scores["baseline"] == scores["current"]
    del models

    names = sorted(d.name for d in args.model_repository.iterdir() if d.is_dir())
    setup = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('service.runtime.graphone', {str(args.baseline.resolve())!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['service.runtime.graphone'] = module\n"
        "spec.loader.exec_module(module)"
    )
    rss: dict[str, list[float]] = {name: [] for name in implementations}
    for r in range(args.rounds):
        for name in implementations if r % 2 == 0 else reversed(implementations):
            rss[name].append(served_rss_mb(args.model_repository, names, setup if name == "baseline" else ""))

    n_hyps = sum(len(h) for _, h in pairs)
    results: dict[str, Any] = {}
    for name in implementations:
        results[name] = {
            "load_s": round(statistics.median(x["seconds"] for x in loads[name]), 3),
            "held_mb": round(statistics.median(x["held_mb"] for x in loads[name]), 1),
            "load_peak_mb": round(statistics.median(x["peak_mb"] for x in loads[name]), 1),
            "scoring_ms_per_word": round(1e3 * statistics.median(seconds[name]) / len(words), 3),
            "served_rss_mb": round(statistics.median(rss[name]), 1),
        }
        print(f"{name}: {results[name]}", flush=True)
    print(f"identical scores on {n_hyps} hypotheses: {identical}")
    write_result(
        args.out,
        started,
        args.beam,
        {
            "words": args.words,
            "hypotheses": n_hyps,
            "bundle": str(args.bundle),
            "baseline": str(args.baseline),
            "served_models": names,
            "rounds": args.rounds,
            "identical_scores": identical,
            "results": results,
        },
    )
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
