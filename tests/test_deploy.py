"""Deployment files are valid: compose (docker-compose config), Dockerfile (hadolint), Prometheus (promtool)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run and the dev extra install it)")
        pytest.skip(f"{name} not installed")
    return path


def test_compose_file_is_valid() -> None:
    result = subprocess.run(
        [tool("docker-compose"), "config", "-q"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_is_valid() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "config", "deploy/prometheus.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_serves_the_shipped_models_without_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY models /models" in text
    assert "RUN pip install --no-cache-dir --prefix=/install .\n" in text  # the plain serving install
    assert "torch" not in text and "[train" not in text
    assert "--host" in text and "0.0.0.0" in text
