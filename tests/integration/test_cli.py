"""`seqserve serve` as a process: answers `seqserve translate`, and SIGTERM stops it with status 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seqserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``seqserve ARGS`` as a subprocess; output captured, exit status not checked."""
    return subprocess.run(
        seqserve(*args), cwd=ROOT, env=env(), input=stdin, capture_output=True, text=True, check=False, timeout=60
    )


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}"}


def wait_serving(target: str, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


def test_serve_translate_and_sigterm(model_repo: Path) -> None:
    port, metrics = free_port(), free_port()
    proc = subprocess.Popen(
        seqserve(
            "serve", "--model-repository", str(model_repo), "--grpc-port", str(port), "--metrics-port", str(metrics)
        ),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        out = run_cli("translate", "--server", f"127.0.0.1:{port}", "--model", "rev", "abc", "fed")
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["c b a", "d e f"]
        out = run_cli("translate", "--server", f"127.0.0.1:{port}", "--model", "rev", "--json", "--n-best", "2", "abc")
        assert out.returncode == 0, out.stderr
        parsed = json.loads(out.stdout)
        assert len(parsed["translations"][0]["hypotheses"]) == 2
        out = run_cli("translate", "--server", f"127.0.0.1:{port}", "--model", "rev", "abc", "a?z")
        assert out.returncode == 0, out.stderr
        assert len(out.stdout.splitlines()) == 2  # still one answer per input; the warning is on stderr
        assert "input 2 has tokens the model does not know: '?', 'z'" in out.stderr
        # a file of words, some blank or refused: one output line per input line, the refused ones reported
        lines = ["abc", "", "fed", "a" * 300, "ab", "ba", "", "cab"]
        out = run_cli(
            "translate", "--server", f"127.0.0.1:{port}", "--model", "rev", "--batch-size", "2",
            stdin="\n".join(lines) + "\n",
        )  # fmt: skip
        assert out.returncode == 1
        assert out.stdout.splitlines() == ["c b a", "", "d e f", "", "b a", "a b", "", "b a c"]
        assert "input 4 has 300 tokens, more than the limit of" in out.stderr
        assert "1 of 8 inputs refused" in out.stderr
        out = run_cli("translate", "--server", f"127.0.0.1:{port}", "--model", "rev", "--no-rescoring", "abc")
        assert out.returncode == 0, out.stderr  # a bundle without a rescorer ranks by the model either way
        assert out.stdout.splitlines() == ["c b a"]
        bad = run_cli("translate", "--server", f"127.0.0.1:{port}", "--model", "nope", "abc")
        assert bad.returncode == 1
        assert bad.stderr.startswith("seqserve translate: NOT_FOUND: no model named 'nope'")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0
    assert "seqserve stopped" in (proc.stderr.read() if proc.stderr else "")


def test_serve_refuses_a_missing_repository(tmp_path: Path) -> None:
    result = run_cli("serve", "--model-repository", str(tmp_path / "absent"))
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--grpc-port", "70000"], "grpc_port must be in 0..65535"),  # used to wrap around to port 4464
        (["--metrics-port", "-2"], "metrics_port must be in -1..65535"),
        (["--threads", "-1"], "threads must be >= 0"),
        (["--poll-interval", "-5"], "poll_interval_s must be a finite number >= 0"),
        (["--grace", "inf"], "grace_s must be a finite number >= 0"),
        (["--max-sources", "0"], "max_sources must be >= 1"),
        (["--workers", "0"], "workers must be >= 1"),
    ],
)
def test_serve_refuses_settings_out_of_range(model_repo: Path, flags: list[str], message: str) -> None:
    result = run_cli("serve", "--model-repository", str(model_repo), *flags)
    assert result.returncode == 2
    assert result.stderr.startswith(f"seqserve serve: {message}"), result.stderr


def test_training_commands_explain_a_missing_train_extra(tmp_path: Path) -> None:
    """In a serving-only install `seqserve train` says what to install instead of a traceback."""
    code = (
        "import sys, importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else real(name, *a)\n"
        "from service.cli import main\n"
        f"sys.exit(main(['train', '--out', {str(tmp_path)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 2
    assert "needs the training extra: pip install 'seqserve[train]' (missing: torch)" in result.stderr
    assert "Traceback" not in result.stderr
