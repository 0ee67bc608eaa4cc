"""The serving install carries no torch; generated protobuf code matches the .proto."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "seqserve" / "v1"


def test_core_dependencies_have_no_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "torch" not in core
    assert project["optional-dependencies"]["train"][0] == "torch==2.13.0"
    assert project["scripts"]["seqserve"] == "service.cli:main"


def test_importing_the_service_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import service, service.server, service.cli, service.engine.engine, service.runtime.ort\n"
        "service.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'tqdm'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'proto'}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr


def test_generated_code_is_in_sync_with_the_proto(tmp_path: Path) -> None:
    """`make proto` output equals the committed files (regenerate with `make proto` after editing the .proto)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).parent / 'protoc-gen-mypy_grpc'}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            str(PROTO / "seqserve.proto"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.name for p in (tmp_path / "seqserve" / "v1").iterdir())
    assert generated == ["seqserve_pb2.py", "seqserve_pb2.pyi", "seqserve_pb2_grpc.py", "seqserve_pb2_grpc.pyi"]
    for name in generated:
        assert filecmp.cmp(tmp_path / "seqserve" / "v1" / name, PROTO / name, shallow=False), f"{name} is stale"
