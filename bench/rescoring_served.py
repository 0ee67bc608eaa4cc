"""Served throughput and latency of a rescoring bundle with and without its rescorer, side by side.

    python -m bench.rescoring_served --model g2p-en --out bench/results/rescoring-served.json

One `seqserve serve` process (defaults: step batching, encoder thread, one worker, one onnxruntime thread) on the
shipped repository; the load generator here, on the same machine. Closed loop, beam 5, one word per request: 64
concurrent clients over 2,000 CMUdict test words and one client at a time over 150, each first with rescoring
(the default) and then with ``no_rescoring`` set on every request, alternating for ``--repeats`` rounds; medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.serving import ROOT, ServerProcess, closed_loop, test_words, write_result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--model-repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="g2p-en")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--concurrent-words", type=int, default=2000)
    p.add_argument("--single-words", type=int, default=150)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rescoring-served.json")
    args = p.parse_args()
    words = test_words(max(args.concurrent_words, args.single_words), args.seed)
    runs: dict[str, list[dict[str, float]]] = {"rescored_64": [], "plain_64": [], "rescored_1": [], "plain_1": []}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    server = ServerProcess(args.model_repository, "step", 1, [])
    try:
        server.wait_ready(args.model)
        for _ in range(args.repeats):  # alternate: the machine's speed drifts between runs
            for clients, count in ((64, args.concurrent_words), (1, args.single_words)):
                for name, plain in (("rescored", False), ("plain", True)):
                    r = asyncio.run(closed_loop(server.target, args.model, words[:count], clients, args.beam, plain))
                    runs[f"{name}_{clients}"].append(r)
                    print(
                        f"{name:8s} {clients:2d} clients: {r['words_per_s']:.1f} words/s, p50 {r['p50_ms']:.2f} ms, "
                        f"p99 {r['p99_ms']:.2f} ms",
                        flush=True,
                    )
    finally:
        server.stop()
    medians: dict[str, dict[str, float]] = {
        k: {m: statistics.median(r[m] for r in v) for m in ("words_per_s", "p50_ms", "p99_ms")} for k, v in runs.items()
    }
    summary: dict[str, Any] = {
        "throughput_ratio_64": medians["rescored_64"]["words_per_s"] / medians["plain_64"]["words_per_s"],
        "p50_ratio_1": medians["rescored_1"]["p50_ms"] / medians["plain_1"]["p50_ms"],
    }
    print(json.dumps(summary))
    write_result(args.out, started, args.beam, {"medians": medians, "summary": summary, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
