"""Protobuf <-> domain conversion and request validation (INVALID_ARGUMENT with a helpful message)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from seqserve.v1 import seqserve_pb2 as pb

from service.engine.beam import OptionsError, SearchOptions, resolve_lengths
from service.errors import InvalidArgument
from service.repository import READY, UNAVAILABLE, UNLOADED, VersionEntry
from service.runtime.bundle import Output

PENALTIES = {
    pb.LENGTH_PENALTY_UNSPECIFIED: "none",
    pb.LENGTH_PENALTY_NONE: "none",
    pb.LENGTH_PENALTY_GNMT: "gnmt",
    pb.LENGTH_PENALTY_AVERAGE: "avg",
}
STATES = {READY: pb.MODEL_STATE_READY, UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE, UNLOADED: pb.MODEL_STATE_UNLOADED}


@dataclass(frozen=True)
class Limits:
    """Per-request bounds, all enforced with INVALID_ARGUMENT."""

    max_sources: int = 256
    max_source_length: int = 256  # tokens; the model's own limit applies too
    max_output_length: int = 512
    max_beam_size: int = 64
    max_source_chars: int = 10_000


@dataclass(frozen=True)
class RequestOptions:
    """Decoding options as the client gave them, before per-source length resolution."""

    beam_size: int
    n_best: int
    max_length: int
    max_length_ratio: float
    min_length: int
    min_length_ratio: float
    length_penalty: str
    alpha: float
    coverage_beta: float
    no_repeat_ngram: int
    sampling: bool
    temperature: float
    top_k: int
    seed: int
    return_attention: bool
    replace_unknowns: bool
    rescore: bool = True

    def for_source(self, src_len: int, default_max: int, hard_max: int) -> SearchOptions:
        max_len, min_len = resolve_lengths(
            src_len,
            self.max_length,
            self.max_length_ratio,
            self.min_length,
            self.min_length_ratio,
            default_max,
            hard_max,
        )
        return SearchOptions(
            beam_size=self.beam_size,
            n_best=self.n_best,
            max_len=max_len,
            min_len=min_len,
            length_penalty=self.length_penalty,
            alpha=self.alpha,
            coverage_beta=self.coverage_beta,
            no_repeat_ngram=self.no_repeat_ngram,
            sampling=self.sampling,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
            keep_attention=self.return_attention or self.replace_unknowns,
        )


def request_options(msg: pb.DecodingOptions, limits: Limits, max_rows: int) -> RequestOptions:
    beam = msg.beam_size or (1 if msg.sampling else 5)
    if beam > limits.max_beam_size:
        raise InvalidArgument(f"beam_size {beam} is larger than the limit of {limits.max_beam_size}")
    if beam > max_rows:
        raise InvalidArgument(f"beam_size {beam} is larger than the server's max rows per step ({max_rows})")
    if msg.max_length > limits.max_output_length:
        raise InvalidArgument(f"max_length {msg.max_length} is larger than the limit of {limits.max_output_length}")
    for name in (
        "max_length_ratio",
        "min_length_ratio",
        "length_penalty_alpha",
        "coverage_penalty_beta",
        "temperature",
    ):
        value = getattr(msg, name)
        if not 0 <= value < math.inf:  # negative, infinite or NaN
            raise InvalidArgument(f"{name} must be a finite number >= 0, got {value}")
    if msg.max_length and msg.min_length > msg.max_length:
        raise InvalidArgument(f"min_length {msg.min_length} is larger than max_length {msg.max_length}")
    if msg.length_penalty not in PENALTIES:
        raise InvalidArgument(f"unknown length_penalty {msg.length_penalty}")
    opts = RequestOptions(
        beam_size=beam,
        n_best=msg.num_hypotheses or 1,
        max_length=msg.max_length,
        max_length_ratio=msg.max_length_ratio,
        min_length=msg.min_length,
        min_length_ratio=msg.min_length_ratio,
        length_penalty=PENALTIES[msg.length_penalty],
        alpha=msg.length_penalty_alpha,
        coverage_beta=msg.coverage_penalty_beta,
        no_repeat_ngram=msg.no_repeat_ngram_size,
        sampling=msg.sampling,
        temperature=msg.temperature or 1.0,
        top_k=msg.top_k,
        seed=msg.seed,
        return_attention=msg.return_attention,
        replace_unknowns=msg.replace_unknowns,
        rescore=not msg.no_rescoring,
    )
    try:  # check the option combination once, with a nominal length
        opts.for_source(1, limits.max_output_length, limits.max_output_length).validate()
    except OptionsError as exc:
        raise InvalidArgument(str(exc)) from exc
    if opts.min_length > limits.max_output_length:
        raise InvalidArgument(f"min_length {opts.min_length} is larger than the limit of {limits.max_output_length}")
    return opts


def check_sources(sources: list[str], limits: Limits) -> None:
    if not sources:
        raise InvalidArgument("the request has no sources")
    if len(sources) > limits.max_sources:
        raise InvalidArgument(f"the request has {len(sources)} sources, more than the limit of {limits.max_sources}")
    for i, s in enumerate(sources):
        if len(s) > limits.max_source_chars:
            raise InvalidArgument(
                f"source {i} has {len(s)} characters, more than the limit of {limits.max_source_chars}"
            )


def hypothesis(out: Output, with_attention: bool) -> pb.Hypothesis:
    msg = pb.Hypothesis(text=out.text, tokens=out.tokens, score=out.score, log_prob=out.log_prob)
    if with_attention and out.attention is not None:
        msg.attention.extend(pb.AttentionRow(weights=row) for row in out.attention)
    return msg


def model_version(entry: VersionEntry) -> pb.ModelVersion:
    msg = pb.ModelVersion(
        name=entry.name,
        version=entry.version,
        state=STATES.get(entry.state, pb.MODEL_STATE_UNSPECIFIED),
        reason=entry.reason,
    )
    bundle = entry.bundle
    if bundle is not None:
        msg.architecture = bundle.manifest.summary()
        msg.source_tokenizer = bundle.manifest.tokenizers["src"].kind
        msg.target_tokenizer = bundle.manifest.tokenizers["tgt"].kind
        msg.quantized = bool(bundle.manifest.quantization)
    return msg
