"""A small synchronous client of the Seq2Seq API (what ``seqserve translate`` uses)."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc


class Client:
    def __init__(self, target: str, timeout_s: float = 30.0) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.Seq2SeqStub(self.channel)
        self.timeout_s = timeout_s

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def translate(self, model: str, sources: list[str], version: int = 0, **options: Any) -> pb.TranslateResponse:
        request = pb.TranslateRequest(
            model=model, version=version, sources=sources, options=pb.DecodingOptions(**options)
        )
        response: pb.TranslateResponse = self.stub.Translate(request, timeout=self.timeout_s)
        return response

    def list_models(self) -> pb.ListModelsResponse:
        response: pb.ListModelsResponse = self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s)
        return response


SOURCE_ERROR = re.compile(r"source \d+ ")  # how the server's INVALID_ARGUMENT messages about one source begin


@dataclass(frozen=True)
class InputError:
    """One input the server refused (INVALID_ARGUMENT), found by asking for it alone."""

    index: int  # 0-based position among all inputs
    code: str
    message: str


class RequestFailed(Exception):
    """A request failed for a reason that is not one input's fault (the model is missing, the server is down, ...)."""

    def __init__(self, first: int, last: int, error: grpc.RpcError) -> None:
        where = f" (inputs {first + 1}-{last + 1}; the ones before them were answered)" if first else ""
        super().__init__(f"{error.code().name}: {error.details()}{where}")
        self.code = error.code()


class BatchTranslator:
    """Many inputs through ``Translate``: ``batch_size`` sources per request, up to ``concurrency`` requests in
    flight, answers in input order. The first request runs alone and the version that answers it is pinned for the
    rest (:attr:`version`), so one run never mixes model versions while the repository changes.

    A blank text yields ``None`` (it is not sent). A request refused with INVALID_ARGUMENT about one of its
    sources is asked again one source at a time, so a bad input costs only itself (an :class:`InputError` in its
    place); any other failure raises :class:`RequestFailed` after the answers before it have been yielded."""

    def __init__(
        self,
        client: Client,
        model: str,
        batch_size: int = 64,
        concurrency: int = 4,
        version: int = 0,
        **options: Any,
    ) -> None:
        if batch_size < 1 or concurrency < 1:
            raise ValueError("batch_size and concurrency must be >= 1")
        self.client, self.model, self.options = client, model, options
        self.batch_size, self.concurrency, self.version = batch_size, concurrency, version

    def _run(self, texts: Sequence[str], chunk: list[int]) -> list[pb.Translation | InputError]:
        try:
            response = self.client.translate(
                self.model, [texts[i] for i in chunk], version=self.version, **self.options
            )
            self.version = self.version or response.version
            return list(response.translations)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            # the server names a refused source "source N ..." (N within the request); anything else (options,
            # model, server) is every input's problem
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or not SOURCE_ERROR.match(details):
                raise RequestFailed(chunk[0], chunk[-1], exc) from None
            if len(chunk) == 1:
                return [InputError(chunk[0], exc.code().name, SOURCE_ERROR.sub("", details, count=1))]
        return [item for i in chunk for item in self._run(texts, [i])]  # which one is refused: each on its own

    def translate(self, texts: Sequence[str]) -> Iterator[pb.Translation | InputError | None]:
        sent = [i for i, text in enumerate(texts) if text.strip()]
        chunks = [sent[i : i + self.batch_size] for i in range(0, len(sent), self.batch_size)]
        answers: dict[int, pb.Translation | InputError] = {}
        next_out = 0

        def ready() -> Iterator[pb.Translation | InputError | None]:
            nonlocal next_out
            while next_out < len(texts) and (next_out in answers or not texts[next_out].strip()):
                yield answers.pop(next_out, None)
                next_out += 1

        if chunks:  # alone, to learn (and pin) the version
            answers.update(zip(chunks[0], self._run(texts, chunks[0]), strict=True))
            yield from ready()
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            rest = chunks[1:]
            for chunk, results in zip(rest, pool.map(lambda c: self._run(texts, c), rest), strict=True):
                answers.update(zip(chunk, results, strict=True))
                yield from ready()
        yield from ready()  # blank texts when nothing was sent
