"""The Seq2Seq gRPC service: thin handlers over the repository and the engines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from service.api.convert import Limits, RequestOptions, check_sources, hypothesis, model_version, request_options
from service.engine.batch import Job
from service.errors import DeadlineExceeded, InvalidArgument, ServeError
from service.metrics import Metrics
from service.repository import ModelRepository
from service.runtime.bundle import Bundle, SourceError
from service.text import UNK_ID

# Requests with at least this many sources build their answer on a worker thread: re-ranking with the graphone
# n-gram costs ≈ 0.5 ms per source, so a 256-source answer held the event loop (every other request) ≈ 0.1 s
ANSWER_OFF_LOOP_FROM = 16
log = logging.getLogger(__name__)

STATUS_CODES: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "INTERNAL": grpc.StatusCode.INTERNAL,
}


class Failure(Exception):
    """Carries a status out of the ``_call`` block to the single place that aborts the RPC."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def answer(
    bundle: Bundle, jobs: list[Job], source_tokens: list[list[str]], opts: RequestOptions
) -> tuple[pb.TranslateResponse, int, int]:
    """The response for finished jobs (n-best re-ranked where the bundle rescores), the best hypotheses' tokens
    and the unknown source tokens counted."""
    response = pb.TranslateResponse(model=bundle.name, version=bundle.version)
    generated = unknown = 0
    for job, tokens in zip(jobs, source_tokens, strict=True):
        outs = bundle.outputs(job, tokens, opts.replace_unknowns, opts.rescore)
        generated += len(outs[0].tokens) if outs else 0
        positions = [i for i, token_id in enumerate(job.src_ids) if token_id == UNK_ID]
        unknown += len(positions)
        response.translations.append(
            pb.Translation(
                hypotheses=[hypothesis(o, opts.return_attention) for o in outs],
                source_tokens=tokens,
                unknown_source_positions=positions,
            )
        )
    return response, generated, unknown


class Seq2SeqServicer(pb_grpc.Seq2SeqServicer):
    def __init__(self, repository: ModelRepository, limits: Limits, metrics: Metrics) -> None:
        self.repository = repository
        self.limits = limits
        self.metrics = metrics

    @contextlib.contextmanager
    def _call(self, method: str, model: str) -> Iterator[None]:
        """The one place where domain errors become gRPC status codes (and metrics are counted)."""
        start = time.perf_counter()
        label = model if model in {e.name for e in self.repository.entries.values()} else "_unknown"
        code = "OK"
        try:
            yield
        except ServeError as exc:
            code = exc.status
            raise Failure(STATUS_CODES[exc.status], exc.message) from exc
        except Failure as exc:
            code = exc.code.name
            raise
        except Exception as exc:
            request_id = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (request id %s)", method, request_id)
            code = "INTERNAL"
            raise Failure(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})") from exc
        finally:
            self.metrics.requests.labels(label, method, code).inc()
            self.metrics.request_seconds.labels(label, method).observe(time.perf_counter() - start)

    async def Translate(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TranslateResponse:
        try:
            with self._call("Translate", request.model):
                return await self._translate(request, context)
        except Failure as f:
            await context.abort(f.code, f.message)
            raise  # unreachable: abort raises

    async def _translate(
        self, request: pb.TranslateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TranslateResponse:
        entry = self.repository.get(request.model, request.version)
        assert entry.engine is not None and entry.bundle is not None
        engine, bundle = entry.engine, entry.bundle
        sources = list(request.sources)
        check_sources(sources, self.limits)
        opts = request_options(request.options, self.limits, engine.settings.max_rows)
        max_src = min(self.limits.max_source_length, bundle.manifest.max_source_length)
        default_max = min(bundle.manifest.default_max_length, self.limits.max_output_length)
        jobs = []
        source_tokens = []
        for i, text in enumerate(sources):
            tokens = bundle.source_tokens(text)
            try:
                job = bundle.make_job(
                    text, opts.for_source(max(len(tokens), 1), default_max, self.limits.max_output_length), max_src
                )
            except SourceError as exc:
                raise InvalidArgument(f"source {i} {exc}") from exc
            jobs.append(job)
            source_tokens.append(tokens)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        if deadline is not None and remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the deadline passed before decoding started")
        await engine.decode(jobs, deadline)
        started = time.perf_counter()
        if len(jobs) >= ANSWER_OFF_LOOP_FROM:  # milliseconds of Python (rescoring): let other requests move meanwhile
            response, generated, unknown = await asyncio.to_thread(answer, bundle, jobs, source_tokens, opts)
        else:
            response, generated, unknown = answer(bundle, jobs, source_tokens, opts)
        if bundle.rescores(opts.beam_size, opts.rescore):
            self.metrics.rescoring_seconds.labels(bundle.name).observe(time.perf_counter() - started)
        self.metrics.generated_tokens.labels(bundle.name).inc(generated)
        if unknown:
            self.metrics.unknown_source_tokens.labels(bundle.name).inc(unknown)
        return response

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_version(e) for e in self.repository.versions()])

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadModelResponse:
        try:
            with self._call("LoadModel", request.model):
                if not request.model or "/" in request.model or request.model.startswith("."):
                    raise InvalidArgument("model must be a directory name in the model repository")
                entries = await self.repository.load_model(request.model)
                return pb.LoadModelResponse(versions=[model_version(e) for e in entries])
        except Failure as f:
            await context.abort(f.code, f.message)
            raise

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnloadModelResponse:
        try:
            with self._call("UnloadModel", request.model):
                await self.repository.unload_model(request.model)
                return pb.UnloadModelResponse()
        except Failure as f:
            await context.abort(f.code, f.message)
            raise
