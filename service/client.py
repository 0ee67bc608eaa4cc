"""A small synchronous client of the Seq2Seq API (what ``seqserve translate`` uses)."""

from __future__ import annotations

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
