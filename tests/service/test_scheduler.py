"""Admission decisions of both batching modes (pure)."""

from __future__ import annotations

from service.engine.scheduler import EngineSettings, Waiting, choose_admissions, expired


def waiting(n: int, rows: int = 5, at: float = 0.0) -> list[Waiting]:
    return [Waiting(rows=rows, enqueued=at, deadline=None) for _ in range(n)]


def test_step_mode_admits_what_fits_next_to_the_running_batch() -> None:
    s = EngineSettings(batching="step", max_rows=20)
    assert choose_admissions(waiting(6), active_rows=0, active_sources=0, now=0.0, settings=s) == (4, 0.0)
    assert choose_admissions(waiting(6), active_rows=15, active_sources=3, now=0.0, settings=s) == (1, 0.0)
    assert choose_admissions(waiting(6), active_rows=20, active_sources=4, now=0.0, settings=s) == (0, 0.0)


def test_request_mode_collects_then_runs_a_whole_batch() -> None:
    s = EngineSettings(batching="request", max_rows=1000, max_batch=4, max_wait_ms=10.0)
    count, wait = choose_admissions(waiting(2, at=0.0), 0, 0, now=0.004, settings=s)
    assert count == 0 and abs(wait - 0.006) < 1e-9  # still collecting
    assert choose_admissions(waiting(2, at=0.0), 0, 0, now=0.011, settings=s) == (2, 0.0)  # window closed
    assert choose_admissions(waiting(6, at=0.0), 0, 0, now=0.001, settings=s) == (4, 0.0)  # batch full
    assert choose_admissions(waiting(6, at=0.0), 20, 4, now=1.0, settings=s) == (0, 0.0)  # batch running


def test_expiry() -> None:
    assert expired(Waiting(5, 0.0, deadline=1.0), now=1.0)
    assert not expired(Waiting(5, 0.0, deadline=None), now=100.0)
    assert expired(Waiting(5, 0.0, deadline=None), now=0.2, max_queue_wait_ms=100)
    assert expired(Waiting(5, 0.0, deadline=None, cancelled=True), now=0.0)


def test_step_mode_join_window_gathers_newcomers_to_a_running_batch() -> None:
    s = EngineSettings(batching="step", max_rows=100, max_batch=4, join_wait_ms=3.0)
    count, wait = choose_admissions(waiting(2, at=0.0), active_rows=10, active_sources=2, now=0.001, settings=s)
    assert count == 0 and abs(wait - 0.002) < 1e-9
    assert choose_admissions(waiting(2, at=0.0), 10, 2, now=0.004, settings=s) == (2, 0.0)  # window over
    assert choose_admissions(waiting(4, at=0.0), 10, 2, now=0.001, settings=s) == (4, 0.0)  # enough gathered
    assert choose_admissions(waiting(2, at=0.0), 0, 0, now=0.0, settings=s) == (2, 0.0)  # idle: join at once
