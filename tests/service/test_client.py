"""``BatchTranslator``: many inputs through Translate in order, bad inputs isolated, one model version per run."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
from seqserve.v1 import seqserve_pb2 as pb

from service.client import BatchTranslator, Client, InputError, RequestFailed


class Refused(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class FakeClient(Client):
    """Upper-cases its sources; refuses sources containing '!' the way the server refuses a source; a newer version
    appears after the first request; optionally fails every request from the n-th on."""

    def __init__(self, fail_from: int | None = None) -> None:  # no channel
        self.requests: list[tuple[list[str], int]] = []
        self.fail_from = fail_from
        self.lock = threading.Lock()

    def translate(self, model: str, sources: list[str], version: int = 0, **options: Any) -> pb.TranslateResponse:
        with self.lock:
            self.requests.append((list(sources), version))
            n = len(self.requests)
        time.sleep(0.01 * (len(sources) % 3))  # answers come back out of order under concurrency
        if self.fail_from is not None and n >= self.fail_from:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "server draining")
        for i, s in enumerate(sources):
            if "!" in s:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"source {i} has a '!'")
        served = version or (1 if n == 1 else 2)
        return pb.TranslateResponse(
            model=model,
            version=served,
            translations=[pb.Translation(hypotheses=[pb.Hypothesis(text=s.upper())]) for s in sources],
        )


def texts_of(results: list[pb.Translation | InputError | None]) -> list[str | None]:
    return [r.hypotheses[0].text if isinstance(r, pb.Translation) else None for r in results]


@pytest.mark.parametrize(("batch_size", "concurrency"), [(1, 1), (2, 3), (3, 8), (64, 4)])
def test_answers_come_in_input_order_with_blanks_kept(batch_size: int, concurrency: int) -> None:
    texts = [f"w{i}" if i % 7 else " " for i in range(40)]
    client = FakeClient()
    batcher = BatchTranslator(client, "m", batch_size=batch_size, concurrency=concurrency)
    results = list(batcher.translate(texts))
    assert texts_of(results) == [t.upper() if t.strip() else None for t in texts]
    assert all(len(sources) <= batch_size and all(s.strip() for s in sources) for sources, _ in client.requests)


def test_the_first_answering_version_is_pinned_for_the_rest() -> None:
    client = FakeClient()
    batcher = BatchTranslator(client, "m", batch_size=2, concurrency=4)
    list(batcher.translate([f"w{i}" for i in range(9)]))
    assert batcher.version == 1  # the fake serves version 2 to unpinned requests after the first
    assert [v for _, v in client.requests] == [0, 1, 1, 1, 1]


def test_a_refused_input_costs_only_itself() -> None:
    texts = ["a", "b!", "c", "d", "e!", "f"]
    results = list(BatchTranslator(FakeClient(), "m", batch_size=3, concurrency=2).translate(texts))
    assert texts_of(results) == ["A", None, "C", "D", None, "F"]
    assert results[1] == InputError(1, "INVALID_ARGUMENT", "has a '!'")
    assert results[4] == InputError(4, "INVALID_ARGUMENT", "has a '!'")


def test_other_failures_stop_after_the_answers_before_them() -> None:
    got: list[str | None] = []
    batcher = BatchTranslator(FakeClient(fail_from=3), "m", batch_size=2, concurrency=1)
    with pytest.raises(RequestFailed, match=r"UNAVAILABLE: server draining \(inputs 5-6; the ones before"):
        for result in batcher.translate([f"w{i}" for i in range(10)]):
            got.extend(texts_of([result]))
    assert got == ["W0", "W1", "W2", "W3"]


def test_batch_size_and_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BatchTranslator(FakeClient(), "m", batch_size=0)
