"""A loaded, verified bundle: manifest + tokenizers + onnxruntime sessions (+ an optional graphone rescorer), and
text <-> jobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from service.engine.batch import Job
from service.engine.beam import BeamSearch, Hypothesis, SearchOptions
from service.runtime.graphone import GraphoneError, GraphoneModel
from service.runtime.manifest import BundleError, Manifest, RescoringSpec, read_manifest, verify_files
from service.runtime.ort import Runtime
from service.text import UNK, Tokenizer, TokenizerError, extend_source, ids_to_tokens


class SourceError(ValueError):
    """A source string the model cannot take (empty, too long)."""


@dataclass(frozen=True)
class Output:
    """One finished hypothesis in text form."""

    text: str
    tokens: list[str]
    score: float
    log_prob: float
    attention: list[list[float]] | None


@dataclass(frozen=True)
class Rescorer:
    """Re-ranks a beam's finished hypotheses with a graphone n-gram (see :class:`RescoringSpec`)."""

    model: GraphoneModel
    spec: RescoringSpec

    def rescore(self, score: float, source_tokens: Sequence[str], tokens: Sequence[str]) -> float:
        """One hypothesis's rescored value."""
        return self.rescore_all(source_tokens, [(score, tokens)])[0]

    def rescore_all(
        self, source_tokens: Sequence[str], hypotheses: Sequence[tuple[float, Sequence[str]]]
    ) -> list[float]:
        """score + weight * graphone log-probability (floor when unsegmentable) + length_weight * (tokens + 1) of
        every (score, tokens) of one source, the graphone search shared between them."""
        graph = self.model.score_many(source_tokens, [tokens for _, tokens in hypotheses], self.spec.beam)
        return [
            score
            + self.spec.weight * (self.spec.floor if g is None else g)
            + self.spec.length_weight * (len(tokens) + 1)
            for (score, tokens), g in zip(hypotheses, graph, strict=True)
        ]


class Bundle:
    def __init__(self, directory: Path, threads: int = 1, device: str = "cpu", verify: bool = True) -> None:
        self.directory = directory
        self.manifest: Manifest = read_manifest(directory)
        if verify:
            verify_files(directory, self.manifest)
        try:
            self.src_tok = Tokenizer.load(self.manifest.tokenizers["src"], directory)
            self.tgt_tok = Tokenizer.load(self.manifest.tokenizers["tgt"], directory)
        except (OSError, TokenizerError) as exc:
            raise BundleError(f"cannot load the tokenizers: {exc}") from exc
        for side, tok in (("src", self.src_tok), ("tgt", self.tgt_tok)):
            if len(tok.vocab) != self.manifest.vocab_sizes[side]:
                raise BundleError(
                    f"{side} vocabulary has {len(tok.vocab)} tokens, the manifest says "
                    f"{self.manifest.vocab_sizes[side]}"
                )
        self.runtime = Runtime(directory, self.manifest, threads=threads, device=device)
        special = self.manifest.special_tokens
        self.pad, self.bos, self.eos, self.unk = special["pad"], special["bos"], special["eos"], special["unk"]
        self.copy = bool(self.manifest.architecture.get("copy", False))
        self.rescorer: Rescorer | None = None
        if self.manifest.rescoring:
            spec = RescoringSpec.from_dict(self.manifest.rescoring)
            try:
                path = directory / spec.file
                # shared only by a verified sha256: bundles with the same n-gram hold one copy of it
                digest = self.manifest.files[spec.file]
                model = GraphoneModel.shared(path, digest) if verify else GraphoneModel.load(path)
                self.rescorer = Rescorer(model, spec)
            except GraphoneError as exc:
                raise BundleError(f"cannot load the rescoring model: {exc}") from exc

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def source_tokens(self, text: str) -> list[str]:
        return self.src_tok.tokenize(text)

    def make_job(self, text: str, options: SearchOptions, max_source_length: int, tag: object = None) -> Job:
        tokens = self.src_tok.tokenize(text)
        if not tokens:
            raise SourceError("is empty after tokenization")
        if len(tokens) > max_source_length:
            raise SourceError(f"has {len(tokens)} tokens, more than the limit of {max_source_length}")
        ids = [self.src_tok.vocab.id(t) for t in tokens]
        ext = None
        vocab_limit = None
        if self.copy:
            ext, oov = extend_source(tokens, self.tgt_tok.vocab)
            vocab_limit = len(self.tgt_tok.vocab) + len(oov)
        search = BeamSearch(options, len(ids), self.bos, self.eos, self.pad, vocab_limit=vocab_limit)
        return Job(search=search, src_ids=ids, src_ext=ext, tag=tag)

    def rescores(self, beam_size: int, rescore: bool = True) -> bool:
        """Whether :meth:`outputs` re-ranks a search of this beam size: the bundle has a rescorer, the request did
        not opt out, and there is more than one hypothesis to choose from (greedy search and sampling have not)."""
        return self.rescorer is not None and rescore and beam_size >= 2

    def outputs(
        self, job: Job, source_tokens: list[str], replace_unknowns: bool = False, rescore: bool = True
    ) -> list[Output]:
        """The n-best of a finished job, best first. When :meth:`rescores`, every hypothesis the beam finished is
        re-ranked first and ``score`` is the rescored value; otherwise the model's ranking and score."""
        search = job.search
        rescorer = self.rescorer if self.rescores(search.options.beam_size, rescore) else None
        if rescorer is None:
            return [self.output(h, source_tokens, replace_unknowns) for h in search.results()]
        outs = [self.output(h, source_tokens, replace_unknowns) for h in search.finished]
        values = rescorer.rescore_all(source_tokens, [(o.score, o.tokens) for o in outs])
        scored = [(value, i) for i, value in enumerate(values)]
        scored.sort(key=lambda pair: (-pair[0], pair[1]))  # ties keep finishing order, like results()
        return [replace(outs[i], score=value) for value, i in scored[: search.options.n_best]]

    def output(self, hyp: Hypothesis, source_tokens: list[str], replace_unknowns: bool) -> Output:
        oov = extend_source(source_tokens, self.tgt_tok.vocab)[1] if self.copy else []
        tokens = ids_to_tokens(hyp.tokens, self.tgt_tok.vocab, oov)
        if replace_unknowns and hyp.attention is not None:
            for pos, token in enumerate(tokens):
                if token == UNK and pos < len(hyp.attention):
                    tokens[pos] = source_tokens[int(np.argmax(hyp.attention[pos]))]
        attention = None if hyp.attention is None else hyp.attention.tolist()
        return Output(self.tgt_tok.detokenize(tokens), tokens, hyp.score, hyp.log_prob, attention)
