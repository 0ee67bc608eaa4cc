"""What graphone rescoring costs beside the decode it follows, with no server in the way.

    python -m bench.rescoring models/g2p-en/2 models/g2p-en-int8/2 --out bench/results/rescoring.json

For each bundle with a rescorer, on the same CMUdict test words, beam 5, one onnxruntime thread: the engine's
search decodes the words offline 64 at a time (seconds per word), then each word's n-best is turned into outputs
the way the server answers (``Bundle.outputs``) without and with rescoring (seconds per word). Three rounds, side
by side, medians reported; the rescorer's step cache starts empty in the first round. Also the memory the
graphone model takes when loaded (tracemalloc; the step cache adds up to ≈ 30 MB) and the share of words whose
best hypothesis changes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench.serving import per_bundle_main
from service.engine.batch import Job, decode_all
from service.engine.beam import SearchOptions
from service.runtime.bundle import Bundle
from service.runtime.graphone import GraphoneModel


def model_mb(path: Path) -> float:
    """Memory a loaded graphone model holds (Python objects and numpy arrays, traced by tracemalloc)."""
    tracemalloc.start()
    try:
        model = GraphoneModel.load(path)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del model
    return held / 2**20


def measure(bundle_dir: Path, words: list[str], beam: int, rounds: int) -> dict[str, Any]:
    bundle = Bundle(bundle_dir)
    if bundle.rescorer is None:
        raise SystemExit(f"{bundle_dir} has no rescorer (export it with --graphone)")
    options = SearchOptions(beam_size=beam, n_best=1, max_len=bundle.manifest.default_max_length)
    sources = [bundle.source_tokens(w) for w in words]
    decode_s, plain_s, rescored_s = [], [], []
    changed = 0
    for _ in range(rounds):
        jobs = [bundle.make_job(w, options, 10_000, tag=i) for i, w in enumerate(words)]
        t0 = time.perf_counter()
        done: list[Job] = decode_all(bundle.runtime, jobs, max_rows=64 * beam, pad_id=bundle.pad)
        decode_s.append(time.perf_counter() - t0)
        done.sort(key=lambda j: j.tag)
        t0 = time.perf_counter()
        plain = [bundle.outputs(j, s, rescore=False) for j, s in zip(done, sources, strict=True)]
        plain_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rescored = [bundle.outputs(j, s) for j, s in zip(done, sources, strict=True)]
        rescored_s.append(time.perf_counter() - t0)
        changed = sum(a[0].tokens != b[0].tokens for a, b in zip(plain, rescored, strict=True) if a and b)
    n = len(words)
    decode = statistics.median(decode_s) / n
    rescoring = (statistics.median(rescored_s) - statistics.median(plain_s)) / n
    return {
        "bundle": str(bundle_dir),
        "quantized": bool(bundle.manifest.quantization),
        "graphone_order": bundle.rescorer.spec.order,
        "decode_ms_per_word": round(decode * 1e3, 3),
        "rescoring_ms_per_word": round(rescoring * 1e3, 3),
        "rescoring_share_of_decode": round(rescoring / decode, 3),
        "best_changed_share": round(changed / n, 4),
        "graphone_model_mb": round(model_mb(bundle_dir / bundle.rescorer.spec.file), 1),
        "step_cache_entries": len(bundle.rescorer.model._steps),
    }


def main() -> int:
    def add_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rounds", type=int, default=3)

    return per_bundle_main(
        __doc__.splitlines()[0] if __doc__ else "",
        "rescoring.json",
        2000,
        add_args,
        lambda bundle_dir, words, args: measure(bundle_dir, words, args.beam, args.rounds),
        lambda r: (
            f"{r['bundle']}: decode {r['decode_ms_per_word']} ms/word, rescoring {r['rescoring_ms_per_word']} ms/word "
            f"({100 * r['rescoring_share_of_decode']:.0f} % of the decode); best changed for "
            f"{100 * r['best_changed_share']:.1f} % of the words; n-gram {r['graphone_model_mb']} MB"
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
