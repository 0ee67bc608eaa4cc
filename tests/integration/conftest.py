"""The real server, started in-process on free ports, in a thread with its own event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from service.engine.scheduler import EngineSettings
from service.server import Server, ServerSettings


class ServerThread:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.server = Server(settings)
        self.loop = asyncio.new_event_loop()
        self._started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.result(timeout=60)
        return self

    def call(self, coro: Any) -> Any:  # run a coroutine on the server's loop
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"


def settings_for(repo: Path, **engine: Any) -> ServerSettings:
    return ServerSettings(
        model_repository=repo,
        grpc_port=0,
        metrics_port=0,
        poll_interval_s=0.2,
        engine=replace(EngineSettings(), **engine),
    )


@pytest.fixture
def server(model_repo: Path) -> Iterator[ServerThread]:
    s = ServerThread(settings_for(model_repo)).start()
    yield s
    s.stop()


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.Seq2SeqStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.Seq2SeqStub(channel)
