"""Server lifecycle: load -> warm up -> SERVING; SIGTERM -> NOT_SERVING -> stop(grace) -> drain -> close."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from service.api.convert import Limits
from service.api.servicer import Seq2SeqServicer
from service.engine.beam import SearchOptions
from service.engine.scheduler import EngineSettings
from service.metrics import Metrics
from service.repository import ModelRepository

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Seq2Seq"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    model_repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    metrics_port: int = 8000  # 0: a free port; -1: no metrics endpoint
    threads: int = 1  # onnxruntime intra-op threads per session
    device: str = "cpu"
    poll_interval_s: float = 5.0  # 0: no polling of the model repository
    grace_s: float = 10.0
    engine: EngineSettings = field(default_factory=EngineSettings)
    limits: Limits = field(default_factory=Limits)

    def validate(self) -> None:
        """ValueError naming the first setting out of range (a port beyond 65535 used to wrap around)."""
        self.engine.validate()
        if not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be in 0..65535 (0: a free port), got {self.grpc_port}")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in -1..65535 (0: a free port, -1: none), got {self.metrics_port}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: onnxruntime's default), got {self.threads}")
        for name in ("poll_interval_s", "grace_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("max_sources", "max_source_length", "max_output_length"):
            if getattr(self.limits, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self.limits, name)}")


class Server:
    def __init__(self, settings: ServerSettings) -> None:
        settings.validate()
        self.settings = settings
        self.metrics = Metrics()
        self.repository = ModelRepository(
            settings.model_repository, settings.engine, self.metrics, threads=settings.threads, device=settings.device
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.grpc_port = 0
        self.metrics_port = 0
        self._server: grpc.aio.Server | None = None
        self._http: Any = None
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        s.engine.validate()
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.repository.scan()
        await self._warm_up()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
            ]
        )
        pb_grpc.add_Seq2SeqServicer_to_server(Seq2SeqServicer(self.repository, s.limits, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.grpc_port = server.add_insecure_port(f"{s.host}:{s.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC to {s.host}:{s.grpc_port}")
        await server.start()
        self._server = server
        if s.metrics_port >= 0:
            self._http, _ = start_http_server(s.metrics_port, addr=s.host, registry=self.metrics.registry)
            self.metrics_port = int(self._http.server_address[1])
        if s.poll_interval_s > 0:
            self._poller = asyncio.create_task(self.repository.poll(s.poll_interval_s))
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        ready = [f"{e.name}/{e.version}" for e in self.repository.versions() if e.engine is not None]
        log.info(
            "seqserve listening on %s:%d (gRPC), metrics on :%s; models ready: %s",
            s.host,
            self.grpc_port,
            self.metrics_port if s.metrics_port >= 0 else "off",
            ", ".join(ready) or "none",
        )

    async def _warm_up(self) -> None:
        """One short decode per ready model, so the first request does not pay for lazy initialisation."""
        for entry in self.repository.versions():
            if entry.engine is None or entry.bundle is None:
                continue
            bundle = entry.bundle
            sample = bundle.src_tok.vocab.itos[4] if len(bundle.src_tok.vocab) > 4 else "a"
            try:
                job = bundle.make_job(sample, SearchOptions(beam_size=2, n_best=1, max_len=3), 10_000)
                await entry.engine.decode([job])
            except Exception:
                log.exception("warm-up of %s version %d failed", entry.name, entry.version)

    async def stop(self) -> None:
        self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()
        if self._server is not None:
            await self._server.stop(self.settings.grace_s)
        await self.repository.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        log.info("seqserve stopped")


async def serve(settings: ServerSettings) -> int:
    server = Server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining")
    await server.stop()
    return 0
