"""The engine's threads survive failures: a failed encoder call or decoder step fails only the sources it held."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from service.engine.batch import Job
from service.engine.beam import BeamSearch, SearchOptions
from service.engine.engine import Engine, StepFailed
from service.engine.scheduler import EngineSettings
from service.metrics import Metrics
from tests.fakes import BOS, EOS, PAD, TableRuntime

BOOM = 9  # a source containing this token makes the runtime fail


class FailingRuntime(TableRuntime):
    def __init__(self) -> None:
        super().__init__(vocab=8, seed=3, eos_bias=-60.0)  # EOS (almost) never: searches run to max_len
        self.fail_at_step = 0  # > 0: the n-th decoder step call from now raises
        self.pause_at_step = 0  # > 0: the n-th decoder step call waits (in the worker thread) for `resume`
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.steps = 0

    def encode(self, src: np.ndarray, src_len: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        if (src == BOOM).any():
            raise RuntimeError("encoder blew up")
        return super().encode(src, src_len)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.steps += 1
        if self.steps == self.pause_at_step:
            self.paused.set()
            self.resume.wait(timeout=30)
        if self.steps == self.fail_at_step:
            raise RuntimeError("decoder step blew up")
        return super().step(*args, **kwargs)


def job(src: list[int], max_len: int) -> Job:
    return Job(BeamSearch(SearchOptions(beam_size=2, max_len=max_len), len(src), BOS, EOS, PAD), src)


def engine(runtime: FailingRuntime, **settings: Any) -> Engine:
    bundle = SimpleNamespace(runtime=runtime, name="fake", version=1, pad=PAD, copy=False)
    return Engine(bundle, replace(EngineSettings(), **settings), Metrics())  # type: ignore[arg-type]


async def started(runtime: FailingRuntime, **settings: Any) -> Engine:
    e = engine(runtime, **settings)
    e.start()
    return e


@pytest.mark.parametrize("encoder_thread", [True, False])
def test_a_failed_encoder_call_fails_only_its_sources(encoder_thread: bool, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        rt = FailingRuntime()
        rt.pause_at_step = 5
        e = await started(rt, encoder_thread=encoder_thread)
        long = asyncio.create_task(e.decode([job([4, 5], max_len=400)]))
        assert await asyncio.to_thread(rt.paused.wait, 30)  # the long source is mid-search, held at its 5th step
        bad = asyncio.create_task(e.decode([job([4, BOOM], max_len=5)]))
        await asyncio.sleep(0)  # queued while the batch is running: it joins at the next step
        rt.resume.set()
        with pytest.raises(StepFailed):
            await bad
        (done,) = await long
        assert len(done.search.results()[0].tokens) == 400  # the running source was not disturbed
        (after,) = await e.decode([job([5, 6], max_len=5)])  # and the engine still serves
        assert after.search.done
        await e.close()

    asyncio.run(main())
    (failure,) = [r for r in caplog.records if "encoder failed" in r.getMessage()]
    assert str(failure.threadName).startswith("enc-" if encoder_thread else "ort-")  # the thread that encoded it


def test_a_failed_decoder_step_fails_the_batch_and_the_worker_goes_on() -> None:
    async def main() -> None:
        rt = FailingRuntime()
        rt.fail_at_step = 10  # mid-search: the job has taken 9 steps (a timed flag raced a fast fake runtime)
        e = await started(rt)
        with pytest.raises(StepFailed):
            await e.decode([job([4, 5], max_len=400)])
        assert rt.steps == 10
        (after,) = await e.decode([job([5, 6], max_len=5)])
        assert after.search.done
        await e.close()

    asyncio.run(main())
