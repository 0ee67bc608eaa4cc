"""Decoder-step call: plain ``InferenceSession.run`` vs IO binding, side by side (BENCHMARKS.md).

python -m bench.iobinding --bundle models/g2p-en/2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.runtime.bundle import Bundle


def median_us(fn: Callable[[], Any], calls: int = 400) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=Path("models/g2p-en/2"))
    p.add_argument("--rows", type=int, nargs="+", default=[5, 80])
    args = p.parse_args()
    bundle = Bundle(args.bundle, threads=1)
    rt = bundle.runtime
    sess = rt._step  # the benchmark measures the raw session
    memory, states = rt.encode(np.array([[5, 6, 7, 8, 9, 10, 11, 12]]), np.array([8]))
    for n in args.rows:
        values = {
            "tokens": np.full(n, 5, dtype=np.int64),
            "feed": rt.initial_feed(n),
            "memory": np.repeat(memory, n, 0),
            "src_len": np.full(n, 8, dtype=np.int64),
            "step": np.zeros(n, dtype=np.int64),
            **{f"state_{name}": np.repeat(s, n, 1) for name, s in zip(rt.state_names, states, strict=True)},
        }
        feeds = {k: v for k, v in values.items() if k in rt._step_inputs}
        outputs = rt._step_outputs
        plain, bound = compare(sess, feeds, outputs)
        print(f"N={n}: run {plain[0]:.0f} / {plain[1]:.0f} us, io binding {bound[0]:.0f} / {bound[1]:.0f} us")


def compare(sess: Any, feeds: dict[str, Any], outputs: list[str]) -> tuple[list[float], list[float]]:
    """Median microseconds per call, alternating run / io binding / run / io binding."""
    binding = sess.io_binding()
    for k, v in feeds.items():
        binding.bind_cpu_input(k, v)
    for o in outputs:
        binding.bind_output(o, "cpu")

    def bound() -> Any:
        sess.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    plain, iob = [], []
    for _ in range(2):
        plain.append(median_us(lambda: sess.run(outputs, feeds)))
        iob.append(median_us(bound))
    return plain, iob


if __name__ == "__main__":
    main()
