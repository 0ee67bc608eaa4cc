"""Small requests beside large ones: answers built on the event loop vs on a worker thread, side by side.

    python -m bench.answer_off_loop --out bench/results/answer-off-loop.json

One `seqserve serve` process on the shipped repository (defaults otherwise), started once per setting with
``service.api.servicer.ANSWER_OFF_LOOP_FROM`` at 16 (the default: requests of 16 or more sources build their answer,
n-best re-ranking included, on a worker thread) or never. One client sends 256-word requests back to back (beam 5,
CMUdict test words); meanwhile another sends ``--small`` one-word requests one after the other and times them.
Settings alternate for ``--repeats`` rounds; the small requests' p50 / p99 and the large requests' words/s per run.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from bench.serving import ROOT, ServerProcess, test_words, write_result
from service.client import Client

NEVER = 10**9


def run(repo: Path, model: str, threshold: int, words: list[str], small: int, seed: int) -> dict[str, float]:
    server = ServerProcess(
        repo, "step", 1, [], setup=f"import service.api.servicer as s\ns.ANSWER_OFF_LOOP_FROM = {threshold}"
    )
    rng = random.Random(seed)
    try:
        server.wait_ready(model)
        client = Client(server.target, 120)
        stop = threading.Event()
        large_words = [0]

        def large() -> None:
            with Client(server.target, 120) as other:
                while not stop.is_set():
                    other.translate(model, rng.sample(words, 256), beam_size=5)
                    large_words[0] += 256

        thread = threading.Thread(target=large)
        thread.start()
        time.sleep(1.0)
        start, before = time.perf_counter(), large_words[0]
        latencies = []
        for word in words[:small]:
            t = time.perf_counter()
            client.translate(model, [word], beam_size=5)
            latencies.append((time.perf_counter() - t) * 1000)
        elapsed = time.perf_counter() - start
        large_rate = (large_words[0] - before) / elapsed
        stop.set()
        thread.join()
        latencies.sort()
        return {
            "small_p50_ms": statistics.median(latencies),
            "small_p99_ms": latencies[max(0, round(0.99 * len(latencies)) - 1)],
            "large_words_per_s": large_rate,
        }
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--model-repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="g2p-en")
    p.add_argument("--small", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "answer-off-loop.json")
    args = p.parse_args()
    words = test_words(2000, args.seed)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    runs: dict[str, list[dict[str, float]]] = {"on_loop": [], "off_loop": []}
    for r in range(args.repeats):
        for name, threshold in (("on_loop", NEVER), ("off_loop", 16)):
            result = run(args.model_repository, args.model, threshold, words, args.small, args.seed + r)
            runs[name].append(result)
            print(name, {k: round(v, 1) for k, v in result.items()}, flush=True)
    summary: dict[str, Any] = {
        name: {key: statistics.median(run[key] for run in results) for key in results[0]}
        for name, results in runs.items()
    }
    write_result(args.out, started, 5, {"model": args.model, "runs": runs, "medians": summary})
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
