"""The recurrent encoder-decoder family (one definition for training, decoding and export).

Shapes: B batch, S source length, T target length, H decoder hidden, M memory
(encoder output) size, E embedding size, V target vocabulary, L decoder layers.

The decoder is written as a *step* (:meth:`Seq2Seq.step`) that also serves as the
body of the exported decoder-step graph, so training, torch decoding and ONNX
export all run the same arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from training.config import ModelConfig

NEG_INF = -1e9  # masked attention score; finite so that fully masked rows stay finite

RNN_CLASSES: dict[str, Any] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}  # constructors by cell name


def state_names(cell: str) -> tuple[str, ...]:
    """Names of the recurrent state tensors, each [L, B, H]."""
    return ("h", "c") if cell == "lstm" else ("h",)


class StepModel(Protocol):
    """What torch decoding and export need from a model: :class:`Seq2Seq` or an ensemble of them."""

    @property
    def state_names(self) -> tuple[str, ...]: ...
    @property
    def feed_size(self) -> int: ...  # width of the input-feeding vector h~ (the decoder step's ``feed``)
    @property
    def uses_copy(self) -> bool: ...  # log-probs over the extended vocabulary; the step takes ``src_ext``
    @property
    def emits_position(self) -> bool: ...  # local-p: the step graph also returns p_t

    def architecture(self) -> dict[str, Any]: ...  # the manifest's description of the model
    def eval(self) -> Any: ...
    def encode(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, list[Tensor]]: ...
    def step(
        self,
        tokens: Tensor,
        states: list[Tensor],
        feed: Tensor,
        memory: Tensor,
        src_len: Tensor,
        step: Tensor,
        src_ext: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]: ...


class Attention(nn.Module):
    """Luong attention: global (dot / general / concat) and local (local-m / local-p)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.attention
        self.score_kind = cfg.local_score if self.kind.startswith("local") else self.kind
        self.window = cfg.local_window
        h, m, a = cfg.dec_hidden, cfg.memory_size, cfg.attn_hidden
        if self.score_kind == "general":
            self.w_general = nn.Linear(h, m, bias=False)
        elif self.score_kind == "concat":
            self.w_query = nn.Linear(h, a, bias=False)
            self.w_key = nn.Linear(m, a, bias=True)
            self.v = nn.Linear(a, 1, bias=False)
        if self.kind == "local-p":
            self.w_pos = nn.Linear(h, a, bias=False)
            self.v_pos = nn.Linear(a, 1, bias=False)

    def score(self, query: Tensor, memory: Tensor) -> Tensor:
        """query [B, T, H], memory [B, S, M] -> scores [B, T, S]."""
        if self.score_kind == "dot":
            return torch.bmm(query, memory.transpose(1, 2))
        if self.score_kind == "general":
            return torch.bmm(self.w_general(query), memory.transpose(1, 2))
        keys = self.w_key(memory).unsqueeze(1)  # [B, 1, S, A]
        queries = self.w_query(query).unsqueeze(2)  # [B, T, 1, A]
        return self.v(torch.tanh(queries + keys)).squeeze(-1)  # [B, T, S]

    def forward(self, query: Tensor, memory: Tensor, src_len: Tensor, step: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """query [B, T, H], memory [B, S, M], src_len [B], step [B, T] (0-based target position).

        Returns context [B, T, M], weights [B, T, S] and the window centre p [B, T]
        (zeros for global attention).
        """
        s_len = memory.size(1)
        positions = torch.arange(s_len, device=memory.device).to(memory.dtype)  # [S]
        valid = positions.view(1, 1, -1) < src_len.view(-1, 1, 1).to(memory.dtype)  # [B, 1, S]
        scores = self.score(query, memory).masked_fill(~valid, NEG_INF)  # [B, T, S]
        centre = torch.zeros_like(step, dtype=memory.dtype)
        if self.kind == "local-m":
            last = (src_len.to(memory.dtype) - 1.0).view(-1, 1)
            centre = torch.minimum(step.to(memory.dtype), last)  # p_t = t, kept inside the source
        elif self.kind == "local-p":
            gate = torch.sigmoid(self.v_pos(torch.tanh(self.w_pos(query)))).squeeze(-1)  # [B, T]
            centre = src_len.to(memory.dtype).view(-1, 1) * gate  # p_t = S * sigmoid(...)
        if self.kind.startswith("local"):
            dist = positions.view(1, 1, -1) - centre.unsqueeze(-1)  # [B, T, S]
            scores = scores.masked_fill(dist.abs() > self.window, NEG_INF)
            weights = torch.softmax(scores, dim=-1)
            sigma = self.window / 2.0
            weights = weights * torch.exp(-(dist * dist) / (2.0 * sigma * sigma))
        else:
            weights = torch.softmax(scores, dim=-1)
        context = torch.bmm(weights, memory)  # [B, T, M]
        return context, weights, centre


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int, pad_id: int = 0, unk_id: int = 3) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.src_vocab = src_vocab
        self.tgt_vocab = tgt_vocab
        self.pad_id = pad_id
        self.unk_id = unk_id
        self._state_names = state_names(cfg.cell)
        rnn = RNN_CLASSES[cfg.cell]
        self.src_emb = nn.Embedding(src_vocab, cfg.emb_size, padding_idx=pad_id)
        self.tgt_emb = nn.Embedding(tgt_vocab, cfg.emb_size, padding_idx=pad_id)
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = rnn(
            cfg.emb_size,
            cfg.enc_hidden,
            cfg.enc_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0,
            bidirectional=cfg.bidirectional,
        )
        dec_in = cfg.emb_size + (cfg.dec_hidden if cfg.input_feed else 0)
        self.decoder = rnn(
            dec_in,
            cfg.dec_hidden,
            cfg.dec_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.dec_layers > 1 else 0.0,
        )
        self.bridge = nn.ModuleList(
            nn.Linear(cfg.memory_size, cfg.dec_layers * cfg.dec_hidden) for _ in self._state_names
        )
        self.attention = Attention(cfg) if cfg.has_attention else None
        if cfg.has_attention:
            self.w_c = nn.Linear(cfg.memory_size + cfg.dec_hidden, cfg.dec_hidden, bias=False)
        self.out = nn.Linear(cfg.dec_hidden, tgt_vocab)
        if cfg.tie_embeddings:
            self.out.weight = self.tgt_emb.weight
        if cfg.copy:
            self.copy_gate = nn.Linear(cfg.memory_size + cfg.dec_hidden + cfg.emb_size, 1)
        self._init_forget_bias()

    @property
    def state_names(self) -> tuple[str, ...]:
        return self._state_names

    @property
    def feed_size(self) -> int:
        return self.cfg.dec_hidden

    @property
    def uses_copy(self) -> bool:
        return self.cfg.copy

    @property
    def emits_position(self) -> bool:
        return self.cfg.attention == "local-p"

    def architecture(self) -> dict[str, Any]:
        return asdict(self.cfg) | {"memory_size": self.cfg.memory_size}

    def _init_forget_bias(self) -> None:
        if self.cfg.cell != "lstm" or self.cfg.forget_bias == 0.0:
            return
        for rnn in (self.encoder, self.decoder):
            for name, param in rnn.named_parameters():
                if name.startswith("bias_"):
                    hidden = param.size(0) // 4
                    with torch.no_grad():  # gate order i, f, g, o; split the bias over ih and hh
                        param[hidden : 2 * hidden].fill_(self.cfg.forget_bias / 2.0)

    # ------------------------------------------------------------------ encoder
    def encode(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, list[Tensor]]:
        """src [B, S] int64, src_len [B] int64 -> memory [B, S, M], states (each [L, B, H])."""
        bsz, s_len = src.shape
        positions = torch.arange(s_len, device=src.device).view(1, -1)  # [1, S]
        valid = positions < src_len.view(-1, 1)  # [B, S]
        if self.cfg.reverse_source:
            rev = (src_len.view(-1, 1) - 1 - positions).clamp(min=0)  # [B, S]
            src = torch.gather(src, 1, rev).masked_fill(~valid, self.pad_id)
        emb = self.emb_dropout(self.src_emb(src))  # [B, S, E]
        packed = pack_padded_sequence(emb, src_len.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=s_len)  # [B, S, M]
        if self.cfg.reverse_source:
            idx = rev.unsqueeze(-1).expand(-1, -1, memory.size(-1))
            memory = torch.gather(memory, 1, idx).masked_fill(~valid.unsqueeze(-1), 0.0)
        finals = list(final) if isinstance(final, tuple) else [final]
        states = []
        for bridge, last in zip(self.bridge, finals, strict=True):
            if self.cfg.bidirectional:
                top = torch.cat([last[-2], last[-1]], dim=-1)  # [B, M]
            else:
                top = last[-1]
            init = torch.tanh(bridge(top)).view(bsz, self.cfg.dec_layers, self.cfg.dec_hidden)
            states.append(init.transpose(0, 1).contiguous())  # [L, B, H]
        return memory, states

    # ------------------------------------------------------------------ decoder
    def _decode_rnn(self, x: Tensor, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """x [B, T, in] -> top-layer outputs [B, T, H] and new states."""
        if self.cfg.cell == "lstm":
            out, (h, c) = self.decoder(x, (states[0], states[1]))
            return out, [h, c]
        out, h = self.decoder(x, states[0])
        return out, [h]

    def _attend(
        self, h: Tensor, memory: Tensor, src_len: Tensor, step: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """h [B, T, H] -> attentional state h~ [B, T, H], context [B, T, M], weights [B, T, S], p [B, T]."""
        if self.attention is None:
            zeros = torch.zeros(h.size(0), h.size(1), memory.size(1), device=h.device, dtype=h.dtype)
            return h, h.new_zeros(h.size(0), h.size(1), 0), zeros, h.new_zeros(h.shape[:2])
        context, weights, centre = self.attention(h, memory, src_len, step)
        attn_state = torch.tanh(self.w_c(torch.cat([context, h], dim=-1)))  # h~ = tanh(W_c [c; h])
        return attn_state, context, weights, centre

    def _log_probs(
        self,
        attn_state: Tensor,
        context: Tensor,
        h: Tensor,
        emb: Tensor,
        weights: Tensor,
        src_ext: Tensor | None,
    ) -> Tensor:
        """-> log-probabilities [B, T, V] (copy: [B, T, V + S] over the extended vocabulary)."""
        logits = self.out(attn_state)  # [B, T, V]
        if self.cfg.temperature != 1.0:  # calibrated confidences (seqserve calibrate); argmax unchanged
            logits = logits / self.cfg.temperature
        if not self.cfg.copy:
            return torch.log_softmax(logits, dim=-1)
        assert src_ext is not None, "copy models need src_ext"
        bsz, t_len, _ = logits.shape
        s_len = weights.size(-1)
        gate = torch.sigmoid(self.copy_gate(torch.cat([context, h, emb], dim=-1)))  # [B, T, 1]
        p_vocab = torch.softmax(logits, dim=-1) * gate
        copy = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9) * (1.0 - gate)  # [B, T, S]
        mixed = torch.cat([p_vocab, p_vocab.new_zeros(bsz, t_len, s_len)], dim=-1)  # [B, T, V + S]
        index = src_ext.unsqueeze(1).expand(bsz, t_len, s_len)
        mixed = mixed.scatter_add(2, index, copy)
        return torch.log(mixed.clamp_min(1e-20))

    def _embed_target(self, tokens: Tensor) -> Tensor:
        if self.cfg.copy:  # extended-vocabulary ids are fed back as <unk>
            tokens = torch.where(tokens >= self.tgt_vocab, torch.full_like(tokens, self.unk_id), tokens)
        return self.emb_dropout(self.tgt_emb(tokens))

    def step(
        self,
        tokens: Tensor,
        states: list[Tensor],
        feed: Tensor,
        memory: Tensor,
        src_len: Tensor,
        step: Tensor,
        src_ext: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], Tensor, Tensor, Tensor]:
        """One decoder step for N rows.

        tokens [N] previous token, states each [L, N, H], feed [N, H] (previous h~),
        memory [N, S, M], src_len [N], step [N] (0-based output position).
        Returns log_probs [N, V'], states, h~ [N, H], attention [N, S], p [N].
        """
        emb = self._embed_target(tokens).unsqueeze(1)  # [N, 1, E]
        x = torch.cat([emb, feed.unsqueeze(1)], dim=-1) if self.cfg.input_feed else emb
        h, states = self._decode_rnn(x, states)  # [N, 1, H]
        attn_state, context, weights, centre = self._attend(h, memory, src_len, step.unsqueeze(1))
        attn_state = self.dropout(attn_state)
        log_probs = self._log_probs(attn_state, context, h, emb, weights, src_ext)
        return log_probs[:, 0], states, attn_state[:, 0], weights[:, 0], centre[:, 0]

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, src_ext: Tensor | None = None) -> Tensor:
        """Teacher forcing: src [B, S], src_len [B], tgt_in [B, T] (starts with <s>) -> log-probs [B, T, V']."""
        memory, states = self.encode(src, src_len)
        bsz, t_len = tgt_in.shape
        steps = torch.arange(t_len, device=src.device).view(1, -1).expand(bsz, -1)  # [B, T]
        emb = self._embed_target(tgt_in)  # [B, T, E]
        if not self.cfg.input_feed:  # the whole target in one RNN call
            h, _ = self._decode_rnn(emb, states)
            attn_state, context, weights, _ = self._attend(h, memory, src_len, steps)
            attn_state = self.dropout(attn_state)
            return self._log_probs(attn_state, context, h, emb, weights, src_ext)
        feed = memory.new_zeros(bsz, self.cfg.dec_hidden)
        outs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        for t in range(t_len):
            x = torch.cat([emb[:, t : t + 1], feed.unsqueeze(1)], dim=-1)
            h, states = self._decode_rnn(x, states)
            attn_state, context, weights, _ = self._attend(h, memory, src_len, steps[:, t : t + 1])
            attn_state = self.dropout(attn_state)
            feed = attn_state[:, 0]
            outs.append((attn_state, context, h, weights))
        attn_state = torch.cat([o[0] for o in outs], dim=1)
        context = torch.cat([o[1] for o in outs], dim=1)
        h = torch.cat([o[2] for o in outs], dim=1)
        weights = torch.cat([o[3] for o in outs], dim=1)
        return self._log_probs(attn_state, context, h, emb, weights, src_ext)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def nll_loss(log_probs: Tensor, target: Tensor, pad_id: int, label_smoothing: float = 0.0) -> Tensor:
    """Mean negative log-likelihood per target token; log_probs [B, T, V'], target [B, T]."""
    flat = log_probs.reshape(-1, log_probs.size(-1))
    gold = target.reshape(-1)
    mask = gold != pad_id
    nll = -flat.gather(1, gold.unsqueeze(1)).squeeze(1)
    if label_smoothing > 0.0:
        smooth = -flat.mean(dim=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def soft_cross_entropy(log_probs: Tensor, ids: Tensor, probs: Tensor, target: Tensor, pad_id: int) -> Tensor:
    """Mean cross-entropy per target token from sparse soft targets: -sum_k probs[k] * log_probs[ids[k]];
    log_probs [B, T, V'], ids / probs [B, T, K] (a teacher's top-K distribution), target [B, T] for the mask."""
    picked = log_probs.gather(2, ids)  # [B, T, K]
    ce = -(picked * probs).sum(dim=-1)  # [B, T]
    mask = target != pad_id
    return (ce * mask).sum() / mask.sum().clamp_min(1)
