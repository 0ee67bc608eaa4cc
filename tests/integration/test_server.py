"""The real server in-process on free ports, called over gRPC."""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from seqserve.v1 import seqserve_pb2 as pb
from seqserve.v1 import seqserve_pb2_grpc as pb_grpc

from service.engine.batch import decode_all
from service.engine.beam import SearchOptions
from service.runtime.bundle import Bundle
from tests.integration.conftest import ServerThread, settings_for

WORDS = ["abc", "hgfed", "jjia", "cabbage", "dig", "fade", "bead", "ideaj", "ab", "gigabed"]


def translate(stub, sources, timeout=30, **options) -> pb.TranslateResponse:
    return stub.Translate(
        pb.TranslateRequest(model="rev", sources=sources, options=pb.DecodingOptions(**options)), timeout=timeout
    )


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_translate_reverses_strings(stub) -> None:
    response = translate(stub, WORDS, beam_size=5)
    assert response.model == "rev" and response.version == 1
    assert len(response.translations) == len(WORDS)
    pairs = zip(WORDS, response.translations, strict=True)
    correct = sum(t.hypotheses[0].text == " ".join(reversed(w)) for w, t in pairs)
    assert correct >= 7, [t.hypotheses[0].text for t in response.translations]
    assert list(response.translations[0].source_tokens) == list("abc")


def test_server_equals_offline_serving_search(stub, tiny_bundle: Path) -> None:
    """What the server returns is exactly the bundle's n-best through the same search offline."""
    bundle = Bundle(tiny_bundle)
    opts = SearchOptions(beam_size=4, n_best=3, max_len=20)
    jobs = decode_all(bundle.runtime, [bundle.make_job(w, opts, 100, tag=i) for i, w in enumerate(WORDS)])
    offline = {j.tag: [h.tokens for h in j.search.results()] for j in jobs}
    response = translate(stub, WORDS, beam_size=4, num_hypotheses=3)
    for i, t in enumerate(response.translations):
        served = [tuple(bundle.tgt_tok.vocab.id(tok) for tok in h.tokens) for h in t.hypotheses]
        assert served == offline[i]
        scores = [h.score for h in t.hypotheses]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize(
    ("batching", "workers", "encoder_thread"),
    [("step", 1, False), ("step", 1, True), ("request", 1, False), ("step", 2, True)],
)
def test_results_are_batch_invariant_under_concurrency(
    model_repo: Path, batching: str, workers: int, encoder_thread: bool
) -> None:
    """Mixed requests, each with its own options, get the same n-best alone or in any batch."""
    variants: list[dict[str, Any]] = [
        {"beam_size": 1},
        {"beam_size": 3, "num_hypotheses": 2},
        {"beam_size": 5, "num_hypotheses": 5, "length_penalty": pb.LENGTH_PENALTY_GNMT, "length_penalty_alpha": 0.6},
        {"beam_size": 4, "no_repeat_ngram_size": 2},
        {"beam_size": 2, "min_length": 3, "coverage_penalty_beta": 0.2},
        {"beam_size": 6, "num_hypotheses": 3, "length_penalty": pb.LENGTH_PENALTY_AVERAGE},
    ]
    requests = [(WORDS[i % len(WORDS)], variants[i % len(variants)]) for i in range(36)]
    server = ServerThread(
        settings_for(
            model_repo, batching=batching, max_batch=8, max_wait_ms=20, workers=workers, encoder_thread=encoder_thread
        )
    ).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.Seq2SeqStub(channel)
            alone = [translate(stub, [w], **o) for w, o in requests]
            with concurrent.futures.ThreadPoolExecutor(max_workers=36) as pool:
                together = list(pool.map(lambda r: translate(stub, [r[0]], **r[1]), requests))
        batch_hist = server.server.metrics.batch_rows.labels("rev")._sum.get()
        assert batch_hist > 0
        pools = [entry.engine for entry in server.server.repository.versions() if entry.engine is not None]
        engines = [e for pool in pools for e in pool.engines]
        aside = sum(e.encoded_aside for e in engines)
        assert aside > 0 if encoder_thread else aside == 0  # sources joined running batches from the encoder thread
    finally:
        server.stop()
    for a, b in zip(alone, together, strict=True):
        ha, hb = a.translations[0].hypotheses, b.translations[0].hypotheses
        assert [list(h.tokens) for h in ha] == [list(h.tokens) for h in hb]
        assert [h.score for h in ha] == pytest.approx([h.score for h in hb], abs=1e-4)


def test_list_models_and_health(server: ServerThread, stub) -> None:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [(m.name, m.version, m.state) for m in models] == [("rev", 1, pb.MODEL_STATE_READY)]
    assert "attention general" in models[0].architecture
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="seqserve.v1.Seq2Seq"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("request_kwargs", "code", "fragment"),
    [
        ({"model": "nope", "sources": ["abc"]}, grpc.StatusCode.NOT_FOUND, "no model named 'nope'"),
        ({"model": "", "sources": ["abc"]}, grpc.StatusCode.INVALID_ARGUMENT, "names no model"),
        ({"model": "rev", "version": 9, "sources": ["abc"]}, grpc.StatusCode.NOT_FOUND, "no version 9"),
        ({"model": "m" * 5000, "sources": ["abc"]}, grpc.StatusCode.INVALID_ARGUMENT, "at most 200 characters"),
        ({"model": "rev", "sources": []}, grpc.StatusCode.INVALID_ARGUMENT, "no sources"),
        ({"model": "rev", "sources": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "source 0"),
        ({"model": "rev", "sources": ["ab", "a" * 300]}, grpc.StatusCode.INVALID_ARGUMENT, "source 1 has 300 tokens"),
        (
            {"model": "rev", "sources": ["ab"], "options": {"beam_size": 1000}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "beam_size 1000",
        ),
        (
            {"model": "rev", "sources": ["ab"], "options": {"beam_size": 2, "num_hypotheses": 3}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "num_hypotheses",
        ),
        (
            {"model": "rev", "sources": ["ab"], "options": {"beam_size": 3, "sampling": True}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling needs beam_size 1",
        ),
        (
            {"model": "rev", "sources": ["ab"], "options": {"max_length": 100000}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_length",
        ),
        (
            {"model": "rev", "sources": ["ab"], "options": {"temperature": -1.0}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        *[
            (
                {"model": "rev", "sources": ["ab"], "options": {name: value}},
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name} must be a finite number >= 0",
            )
            for name in ("max_length_ratio", "min_length_ratio", "coverage_penalty_beta", "length_penalty_alpha")
            for value in (math.inf, math.nan)
        ],
        (
            {"model": "rev", "sources": ["ab"], "options": {"min_length": 9, "max_length": 3}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "min_length 9 is larger than max_length 3",
        ),
    ],
)
def test_bad_requests_get_typed_errors(stub, request_kwargs, code, fragment) -> None:
    options = pb.DecodingOptions(**request_kwargs.pop("options", {}))
    err = rpc_error(lambda: stub.Translate(pb.TranslateRequest(options=options, **request_kwargs), timeout=10))
    assert err.code() == code
    assert fragment in (err.details() or "")
    assert "Traceback" not in (err.details() or "")


def test_oversized_message_is_resource_exhausted(stub) -> None:
    err = rpc_error(lambda: translate(stub, ["a" * 5_000_000]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_full_queue_is_resource_exhausted(model_repo: Path) -> None:
    server = ServerThread(settings_for(model_repo, max_queue=3)).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.Seq2SeqStub(channel)
            err = rpc_error(lambda: translate(stub, WORDS[:5]))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in (err.details() or "")
            assert translate(stub, WORDS[:2]).translations  # within the bound it serves
    finally:
        server.stop()


def _engine(server: ServerThread):
    return server.server.repository.get("rev").engine


def test_deadline_exceeded_frees_rows(server: ServerThread, stub) -> None:
    many = [w * 3 for w in WORDS] * 20
    err = rpc_error(lambda: translate(stub, many, timeout=0.002, beam_size=16, max_length=200, min_length=150))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    engine = _engine(server)
    end = time.monotonic() + 10
    while (engine.active or engine.queued) and time.monotonic() < end:
        time.sleep(0.02)
    assert engine.active == 0 and engine.queued == 0


def test_cancelled_request_frees_rows(server: ServerThread, stub) -> None:
    many = [w * 3 for w in WORDS] * 20
    call = stub.Translate.future(
        pb.TranslateRequest(
            model="rev", sources=many, options=pb.DecodingOptions(beam_size=16, max_length=200, min_length=150)
        )
    )
    engine = _engine(server)
    end = time.monotonic() + 10
    while engine.active == 0 and time.monotonic() < end:
        time.sleep(0.005)
    assert engine.active > 0
    call.cancel()
    end = time.monotonic() + 10
    while (engine.active or engine.queued) and time.monotonic() < end:
        time.sleep(0.02)
    assert engine.active == 0 and engine.queued == 0
    rejected = server.server.metrics.rejected.labels("rev", "cancelled")._value.get()
    assert rejected > 0


def test_attention_is_returned_per_output_token(stub) -> None:
    response = translate(stub, ["abcd"], beam_size=2, return_attention=True)
    t = response.translations[0]
    hyp = t.hypotheses[0]
    assert len(hyp.attention) == len(hyp.tokens) > 0
    assert all(len(row.weights) == len(t.source_tokens) for row in hyp.attention)
    assert all(abs(sum(row.weights) - 1.0) < 1e-4 for row in hyp.attention)  # global attention sums to 1
    assert not translate(stub, ["abcd"], beam_size=2).translations[0].hypotheses[0].attention


def test_unload_and_load_through_the_api(stub) -> None:
    stub.UnloadModel(pb.UnloadModelRequest(model="rev"), timeout=10)
    assert rpc_error(lambda: translate(stub, ["abc"])).code() == grpc.StatusCode.NOT_FOUND
    versions = stub.LoadModel(pb.LoadModelRequest(model="rev"), timeout=30).versions
    assert [(v.version, v.state) for v in versions] == [(1, pb.MODEL_STATE_READY)]
    assert translate(stub, ["abc"]).translations[0].hypotheses
    err = rpc_error(lambda: stub.LoadModel(pb.LoadModelRequest(model="../etc"), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(lambda: stub.LoadModel(pb.LoadModelRequest(model="absent"), timeout=10))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    for call, request in ((stub.LoadModel, pb.LoadModelRequest), (stub.UnloadModel, pb.UnloadModelRequest)):
        # longer than a file name may be: refused up front, not an OSError from the file system (was INTERNAL)
        err = rpc_error(lambda call=call, request=request: call(request(model="a" * 300), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == "model names are at most 200 characters"


def _wait_for(predicate, timeout=15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_live_repository_new_corrupted_and_broken_versions(
    server: ServerThread, stub, model_repo: Path, caplog
) -> None:
    caplog.set_level(logging.ERROR, logger="service.repository")
    # a corrupted copy next to the good model is refused, with a log line naming it; the good model serves
    bad = model_repo / "rev-copy" / "1"
    shutil.copytree(model_repo / "rev" / "1", bad)
    manifest = (bad / "manifest.json").read_text().replace('"name": "rev"', '"name": "rev-copy"')
    (bad / "manifest.json").write_text(manifest)
    with (bad / "decoder_step.onnx").open("r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")

    def states() -> dict[tuple[str, int], Any]:
        return {(m.name, m.version): m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}

    assert _wait_for(lambda: ("rev-copy", 1) in states())
    refused = states()[("rev-copy", 1)]
    assert refused.state == pb.MODEL_STATE_UNAVAILABLE
    assert "decoder_step.onnx is corrupted" in refused.reason
    assert any("rev-copy version 1 refused" in r.getMessage() and "corrupted" in r.getMessage() for r in caplog.records)
    assert (
        rpc_error(lambda: stub.Translate(pb.TranslateRequest(model="rev-copy", sources=["ab"]), timeout=10)).code()
        == grpc.StatusCode.UNAVAILABLE
    )
    assert translate(stub, ["abc"]).translations[0].hypotheses

    # a new version is picked up without restart and becomes the default
    shutil.copytree(model_repo / "rev" / "1", model_repo / "rev" / "2.tmp")
    m2 = (model_repo / "rev" / "2.tmp" / "manifest.json").read_text().replace('"version": 1', '"version": 2')
    (model_repo / "rev" / "2.tmp" / "manifest.json").write_text(m2)
    (model_repo / "rev" / "2.tmp").rename(model_repo / "rev" / "2")
    assert _wait_for(lambda: states().get(("rev", 2)) is not None and states()[("rev", 2)].state == 1)
    assert translate(stub, ["abc"]).version == 2

    # a broken newer version is refused while version 2 keeps serving
    shutil.copytree(model_repo / "rev" / "2", model_repo / "rev" / "3")
    (model_repo / "rev" / "3" / "manifest.json").write_text("{ not json")
    assert _wait_for(lambda: ("rev", 3) in states())
    assert states()[("rev", 3)].state == pb.MODEL_STATE_UNAVAILABLE
    assert translate(stub, ["abc"]).version == 2


def test_large_answers_are_built_off_the_event_loop(server: ServerThread, stub, monkeypatch) -> None:
    """Re-ranking a large request's n-best lists is milliseconds of Python per source: it runs on a worker thread so
    that other requests move meanwhile; small answers stay on the loop (no hand-off cost)."""
    from service.api import servicer

    threads: list[threading.Thread] = []
    build = servicer.answer

    def recording(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return build(*args)

    monkeypatch.setattr(servicer, "answer", recording)
    many = [WORDS[i % len(WORDS)] for i in range(servicer.ANSWER_OFF_LOOP_FROM)]
    large = translate(stub, many, beam_size=3)
    small = translate(stub, many[:2], beam_size=3)
    assert threads[0] is not server._thread and threads[1] is server._thread
    assert [t.hypotheses[0].text for t in large.translations[:2]] == [t.hypotheses[0].text for t in small.translations]


def unknown_tokens_counted(server: ServerThread) -> float:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    prefix = 'seqserve_unknown_source_tokens_total{model="rev"} '
    return sum(float(line.removeprefix(prefix)) for line in body.splitlines() if line.startswith(prefix))


def test_unknown_source_tokens_are_reported(server: ServerThread, stub) -> None:
    """Characters the model never saw are read as <unk>: the answer says where, the metrics count them."""
    before = unknown_tokens_counted(server)
    response = translate(stub, ["abc", "a?bz", "??"], beam_size=3)
    assert [list(t.unknown_source_positions) for t in response.translations] == [[], [1, 3], [0, 1]]
    assert list(response.translations[1].source_tokens) == ["a", "?", "b", "z"]
    assert all(t.hypotheses for t in response.translations)  # still answered
    assert unknown_tokens_counted(server) == before + 4


def test_metrics_endpoint(server: ServerThread, stub) -> None:
    translate(stub, ["abc", "de"])
    rpc_error(lambda: stub.Translate(pb.TranslateRequest(model="nope", sources=["a"]), timeout=10))
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'seqserve_requests_total{code="OK",method="Translate",model="rev"} 1.0' in body
    assert 'seqserve_requests_total{code="NOT_FOUND",method="Translate",model="_unknown"} 1.0' in body
    for name in (
        "seqserve_decoder_step_duration_seconds_count",
        "seqserve_encoder_duration_seconds_count",
        "seqserve_queue_wait_seconds_count",
        "seqserve_batch_rows_count",
        "seqserve_model_ready{",
    ):
        assert name in body
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (CI installs Debian's prometheus package)")
        pytest.skip("promtool not installed")
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_waiting_too_long_in_the_queue_is_resource_exhausted(model_repo: Path) -> None:
    """With one row per step and a 1 ms queue limit, a burst cannot all wait its turn."""
    server = ServerThread(settings_for(model_repo, max_rows=1, max_queue_wait_ms=1)).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.Seq2SeqStub(channel)
            err = rpc_error(
                lambda: translate(stub, [w * 4 for w in WORDS] * 3, beam_size=1, min_length=30, max_length=40)
            )
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "in the queue" in (err.details() or "")
    finally:
        server.stop()


def test_reflection_lists_the_services(server: ServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"seqserve.v1.Seq2Seq", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("batching", ["step", "request"])
def test_when_finished_sources_are_answered(model_repo: Path, batching: str, monkeypatch) -> None:
    """Step batching answers each source the step it ends; request batching answers a batch as a whole."""
    from service.engine.engine import Engine

    answered: list[int] = []
    original = Engine._finished

    def record(self, jobs, error):
        answered.append(len(jobs))
        original(self, jobs, error)

    monkeypatch.setattr(Engine, "_finished", record)
    server = ServerThread(settings_for(model_repo, batching=batching, max_batch=4, max_wait_ms=500)).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.Seq2SeqStub(channel)
            answered.clear()  # forget the warm-up
            words = ["ab", "abcdefghij" * 2, "abc", "abcdefgh"]  # very different output lengths
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda w: translate(stub, [w], beam_size=2), words))
    finally:
        server.stop()
    if batching == "request":
        assert answered == [4]
    else:
        assert len(answered) > 1 and sum(answered) == 4


def test_request_batching_answers_finished_sources_when_the_rest_of_the_batch_is_dropped(model_repo: Path) -> None:
    server = ServerThread(settings_for(model_repo, batching="request", max_batch=2, max_wait_ms=300)).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.Seq2SeqStub(channel)
            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                slow = pool.submit(
                    translate, stub, ["abcdefghij" * 2], 0.15, beam_size=64, min_length=500, max_length=500
                )
                time.sleep(0.05)
                quick = pool.submit(translate, stub, ["ab"], 20, beam_size=1)
                assert quick.result().translations[0].hypotheses  # answered although its batch partner was dropped
                with pytest.raises(grpc.RpcError) as info:
                    slow.result()
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert translate(stub, ["abc"]).translations  # and the engine admits new batches afterwards
    finally:
        server.stop()


def test_rescoring_bundle_serves_rescored_rankings_and_obeys_no_rescoring(
    rescored_bundle: Path, tmp_path: Path
) -> None:
    """A bundle with a graphone rescorer: the server's n-best is the bundle's rescored ranking; no_rescoring gives
    the model's own ranking and scores back."""
    repo = tmp_path / "models"
    shutil.copytree(rescored_bundle, repo / "rev" / "1")
    bundle = Bundle(rescored_bundle)
    opts = SearchOptions(beam_size=5, n_best=3, max_len=20)
    jobs = decode_all(bundle.runtime, [bundle.make_job(w, opts, 100, tag=i) for i, w in enumerate(WORDS)])
    jobs.sort(key=lambda j: j.tag)  # decode_all returns them as they finish
    s = ServerThread(settings_for(repo)).start()
    try:
        with grpc.insecure_channel(s.target) as channel:
            stub = pb_grpc.Seq2SeqStub(channel)
            rescored = translate(stub, WORDS, beam_size=5, num_hypotheses=3)
            plain = translate(stub, WORDS, beam_size=5, num_hypotheses=3, no_rescoring=True)
            translate(stub, WORDS[:2], beam_size=1)  # greedy: nothing to re-rank
        url = f"http://127.0.0.1:{s.server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'seqserve_rescoring_duration_seconds_count{model="rev"} 1.0' in body  # the rescored request only
    finally:
        s.stop()
    for job, r, p in zip(jobs, rescored.translations, plain.translations, strict=True):
        src = bundle.source_tokens(WORDS[job.tag])
        want = bundle.outputs(job, src)
        assert [list(h.tokens) for h in r.hypotheses] == [o.tokens for o in want]
        assert [h.score for h in r.hypotheses] == pytest.approx([o.score for o in want], rel=1e-6)
        model_only = bundle.outputs(job, src, rescore=False)
        assert [list(h.tokens) for h in p.hypotheses] == [o.tokens for o in model_only]
        assert [h.score for h in p.hypotheses] == pytest.approx([o.score for o in model_only], rel=1e-6)
