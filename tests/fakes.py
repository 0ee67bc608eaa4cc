"""A fake runtime: log-probabilities from a hand-made transition table keyed by the whole prefix.

The recurrent "state" is an exact integer code of the prefix (source and emitted tokens), so a
hypothesis whose state was not reordered with it gets another hypothesis's distribution: tests
that compare against brute force catch any state bookkeeping error.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from service.engine.beam import NEG_INF

PAD, BOS, EOS, UNK = 0, 1, 2, 3
MOD = 1_000_003


@dataclass
class FakeStep:
    log_probs: np.ndarray
    states: list[np.ndarray]
    feed: np.ndarray
    attention: np.ndarray


class TableRuntime:
    """V tokens: specials 0..3 then real tokens 4..V-1. Distributions seeded per prefix code."""

    def __init__(self, vocab: int = 7, seed: int = 0, eos_bias: float = 0.0) -> None:
        self.vocab = vocab
        self.seed = seed
        self.eos_bias = eos_bias
        self.calls = 0
        self.rows_seen: list[int] = []

    def dist(self, code: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, code))
        logits = rng.normal(0.0, 2.0, self.vocab)
        logits[[PAD, BOS, UNK]] = -1e9
        logits[EOS] += self.eos_bias
        logits = logits - logits.max()
        out: np.ndarray = (logits - np.log(np.exp(logits).sum())).astype(np.float32)
        return out

    @staticmethod
    def extend(code: int, token: int) -> int:
        return (code * 31 + token + 1) % MOD

    def encode(self, src: np.ndarray, src_len: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        codes = []
        for row, n in zip(src, src_len, strict=True):
            code = 7
            for t in row[:n]:
                code = self.extend(code, int(t))
            codes.append(code)
        memory = np.zeros((src.shape[0], src.shape[1], 2), dtype=np.float32)
        state = np.array(codes, dtype=np.float64).reshape(1, -1, 1)
        return memory, [state]

    def step(self, tokens, states, feed, memory, src_len, step, src_ext=None) -> FakeStep:
        self.calls += 1
        self.rows_seen.append(len(tokens))
        codes = [self.extend(int(c), int(t)) for c, t in zip(states[0][0, :, 0], tokens, strict=True)]
        log_probs = np.stack([self.dist(c) for c in codes])
        s = memory.shape[1]
        attention = np.zeros((len(tokens), s), dtype=np.float32)
        for i, n in enumerate(src_len):  # attend to position step % len, a deterministic alignment
            attention[i, int(step[i]) % int(n)] = 1.0
        new_state = np.array(codes, dtype=np.float64).reshape(1, -1, 1)
        return FakeStep(log_probs, [new_state], feed, attention)

    def initial_feed(self, rows: int) -> np.ndarray:
        return np.zeros((rows, 1), dtype=np.float32)

    # ------------------------------------------------------------ references
    def start_code(self, src: list[int]) -> int:
        _, states = self.encode(np.array([src]), np.array([len(src)]))
        return int(states[0][0, 0, 0])

    def greedy(self, src: list[int], max_len: int) -> tuple[tuple[int, ...], float]:
        code = self.start_code(src)
        token, total = BOS, 0.0
        out: list[int] = []
        for _ in range(max_len):
            code = self.extend(code, token)
            lp = self.dist(code)
            token = int(np.argmax(lp))
            total = float(np.float32(total) + lp[token])
            if token == EOS:
                return tuple(out), total
            out.append(token)
        return tuple(out), total

    def exhaustive(self, src: list[int], max_len: int) -> tuple[tuple[int, ...], float]:
        """The best sequence over every possible output (ended by EOS, or cut at max_len)."""
        best: tuple[tuple[int, ...], float] = ((), NEG_INF)
        real = range(4, self.vocab)
        start = self.start_code(src)
        for length in range(max_len + 1):
            for seq in itertools.product(real, repeat=length):
                code, total, token = start, np.float32(0.0), BOS
                for tok in seq:
                    code = self.extend(code, token)
                    total = np.float32(total + self.dist(code)[tok])
                    token = tok
                if length < max_len:
                    code = self.extend(code, token)
                    total = np.float32(total + self.dist(code)[EOS])
                if float(total) > best[1]:
                    best = (seq, float(total))
        return best
