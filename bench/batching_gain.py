"""How much batching itself gains per bundle, with no server in the way.

    python -m bench.batching_gain models/g2p-en/1 models/g2p-en-int8/1 --out bench/results/batching-gain.json

For each bundle, on the same CMUdict test words, beam 5, one onnxruntime thread: the bare cost of one word
(its encoder call plus the decoder-step calls its search makes, nothing else; median over words, best of 3
each) against the engine's own search decoding the words offline 64 at a time (seconds per word, best of 2).
Their ratio is what batching can buy on this machine for that model; anything a server gains beyond it comes
from sharing its per-request fixed costs (gRPC, scheduling), not from the model running faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from bench.serving import ROOT, bare_onnxruntime_cost, batched_cost_per_word, test_words
from service.runtime.bundle import Bundle


def measure(bundle_dir: Path, words: list[str], single: int, beam: int) -> dict[str, float | str]:
    bundle = Bundle(bundle_dir)
    bare = statistics.median(bare_onnxruntime_cost(bundle, words[:single], beam))
    batched = batched_cost_per_word(bundle, words, beam)
    size = sum(p.stat().st_size for p in bundle_dir.iterdir() if p.suffix == ".onnx")
    return {
        "bundle": str(bundle_dir),
        "architecture": bundle.manifest.summary() + (" (int8)" if bundle.manifest.quantization else ""),
        "onnx_bytes": size,
        "bare_one_word_ms": round(bare * 1e3, 3),
        "batched_64_ms_per_word": round(batched * 1e3, 3),
        "gain": round(bare / batched, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", type=Path, nargs="+", help="bundle directories REPO/NAME/VERSION")
    p.add_argument("--words", type=int, default=400, help="CMUdict test words for the batched decode")
    p.add_argument("--single-words", type=int, default=60, help="of those, words timed one at a time")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batching-gain.json")
    args = p.parse_args()
    words = test_words(args.words, args.seed)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results = []
    for bundle_dir in args.bundles:
        r = measure(bundle_dir, words, args.single_words, args.beam)
        print(
            f"{r['bundle']}: one word {r['bare_one_word_ms']} ms bare, batched {r['batched_64_ms_per_word']} ms "
            f"per word: batching gains {r['gain']}x",
            flush=True,
        )
        results.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"started": started, "machine": platform.processor() or platform.machine(), "beam": args.beam}
    args.out.write_text(json.dumps(record | {"words": args.words, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
