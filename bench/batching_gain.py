"""How much batching itself gains per bundle, with no server in the way.

    python -m bench.batching_gain models/g2p-en/2 models/g2p-en-int8/2 --out bench/results/batching-gain.json

For each bundle, on the same CMUdict test words, beam 5, one onnxruntime thread: the bare cost of one word
(its encoder call plus the decoder-step calls its search makes, nothing else; median over words, best of 3
each) against the engine's own search decoding the words offline 64 at a time (seconds per word, best of 2).
Their ratio is what batching can buy on this machine for that model; anything a server gains beyond it comes
from sharing its per-request fixed costs (gRPC, scheduling), not from the model running faster.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.serving import bare_onnxruntime_cost, batched_cost_per_word, per_bundle_main
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
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--single-words", type=int, default=60, help="of those, words timed one at a time")

    return per_bundle_main(
        __doc__.splitlines()[0] if __doc__ else "",
        "batching-gain.json",
        400,
        add_args,
        lambda bundle_dir, words, args: measure(bundle_dir, words, args.single_words, args.beam),
        lambda r: (
            f"{r['bundle']}: one word {r['bare_one_word_ms']} ms bare, batched {r['batched_64_ms_per_word']} ms "
            f"per word: batching gains {r['gain']}x"
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
