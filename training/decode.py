"""Greedy and beam search in torch: the reference that the served bundle is checked against.

Semantics (shared exactly with ``service.engine.beam``): each source keeps K live
hypotheses; every step takes the 2K best candidates by accumulated log-probability
(ties broken by lower flat index); an end-of-sentence candidate ranked within the
first K is finished, other candidates refill the K live beams in order. A source is
done when it has K finished hypotheses; at ``max_len`` the live ones are finished as
they are. Finished hypotheses are ranked by the length-normalised score. ``<pad>`` and
``<s>`` are never generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from service.engine.beam import normalise
from service.text import BOS_ID, EOS_ID, NEVER_GENERATED, PAD_ID
from training.model import StepModel

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # without <s> and </s>
    score: float  # length-normalised
    log_prob: float  # sum of token log-probabilities


@torch.no_grad()
def beam_search(
    model: StepModel,
    src: Tensor,
    src_len: Tensor,
    beam: int = 5,
    n_best: int = 1,
    max_len: int = 50,
    min_len: int = 0,
    length_penalty: str = "none",
    alpha: float = 0.0,
    src_ext: Tensor | None = None,
) -> list[list[Hypothesis]]:
    """src [B, S], src_len [B] -> for each source its n-best hypotheses, best first."""
    model.eval()
    bsz, k = src.size(0), beam
    memory, states = model.encode(src, src_len)
    rows = torch.arange(bsz, device=src.device).repeat_interleave(k)  # [N = B*K]
    memory, lens = memory[rows], src_len[rows]
    ext = None if src_ext is None else src_ext[rows]
    states = [s[:, rows] for s in states]  # each [L, N, H]: the batch axis is 1
    feed = memory.new_zeros(bsz * k, model.feed_size)
    scores = [[0.0] + [NEG_INF] * (k - 1) for _ in range(bsz)]
    seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(bsz)]
    tokens = torch.full((bsz * k,), BOS_ID, dtype=torch.long, device=src.device)
    finished: list[list[Hypothesis]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    for t in range(max_len):
        step = torch.full((bsz * k,), t, dtype=torch.long, device=src.device)
        log_probs, states, feed, _, _ = model.step(tokens, states, feed, memory, lens, step, ext)
        log_probs = log_probs.float()  # [N, V']
        log_probs[:, NEVER_GENERATED] = NEG_INF
        if t < min_len:
            log_probs[:, EOS_ID] = NEG_INF
        vocab = log_probs.size(1)
        prev = torch.tensor(scores, dtype=torch.float32, device=src.device).view(-1, 1)
        cand = (prev + log_probs).view(bsz, k * vocab)
        vals_t, idx_t = torch.sort(cand, dim=1, descending=True, stable=True)
        vals, idx = vals_t[:, : 2 * k].tolist(), idx_t[:, : 2 * k].tolist()
        select: list[int] = []
        new_tokens: list[int] = []
        for b in range(bsz):
            live: list[tuple[int, int, float]] = []
            if not done[b]:
                for j in range(2 * k):
                    value = vals[b][j]
                    if value == NEG_INF:
                        break
                    beam_k, token = divmod(idx[b][j], vocab)
                    if token == EOS_ID:
                        if j < k:
                            norm = normalise(value, t + 1, length_penalty, alpha)
                            finished[b].append(Hypothesis(tuple(seqs[b][beam_k]), norm, value))
                    elif len(live) < k:
                        live.append((beam_k, token, value))
                if len(finished[b]) >= k or not live:
                    done[b] = True
                    live = []
            new_seqs = [seqs[b][bk] + [tok] for bk, tok, _ in live]
            scores[b] = [v for _, _, v in live] + [NEG_INF] * (k - len(live))
            seqs[b] = new_seqs + [[] for _ in range(k - len(live))]
            select.extend(b * k + bk for bk, _, _ in live)
            select.extend([b * k] * (k - len(live)))
            new_tokens.extend(tok for _, tok, _ in live)
            new_tokens.extend([PAD_ID] * (k - len(live)))
        if all(done):
            break
        index = torch.tensor(select, dtype=torch.long, device=src.device)
        states = [s.index_select(1, index) for s in states]
        feed = feed.index_select(0, index)
        tokens = torch.tensor(new_tokens, dtype=torch.long, device=src.device)
    for b in range(bsz):
        if done[b]:
            continue
        for seq, value in zip(seqs[b], scores[b], strict=True):
            if value != NEG_INF:
                finished[b].append(Hypothesis(tuple(seq), normalise(value, len(seq), length_penalty, alpha), value))
    return [sorted(f, key=lambda h: -h.score)[:n_best] for f in finished]


def greedy(
    model: StepModel, src: Tensor, src_len: Tensor, max_len: int = 50, src_ext: Tensor | None = None
) -> list[Hypothesis]:
    """Beam search with K = 1 is greedy search."""
    return [h[0] for h in beam_search(model, src, src_len, beam=1, n_best=1, max_len=max_len, src_ext=src_ext)]
