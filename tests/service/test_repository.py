"""The model repository's layout rules: which directories are versions, and bundles that lie in the wrong one."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from service.engine.scheduler import EngineSettings
from service.metrics import Metrics
from service.repository import READY, UNAVAILABLE, ModelRepository, version_dirs


def test_only_canonical_positive_integers_are_versions(tmp_path: Path) -> None:
    for name in ["1", "12", "01", "0", "-3", "abc", "\u0661", "2.tmp", "4"]:  # U+0661: ARABIC-INDIC DIGIT ONE
        (tmp_path / name).mkdir()
        if name != "4":  # a version directory without a manifest (yet) is not a version
            (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / "7").write_text("a file, not a directory")
    assert version_dirs(tmp_path) == {1: tmp_path / "1", 12: tmp_path / "12"}


def test_a_bundle_copied_under_another_version_is_refused_with_the_fix(model_repo: Path) -> None:
    shutil.copytree(model_repo / "rev" / "1", model_repo / "rev" / "2")  # manifest still says version 1

    async def scan() -> ModelRepository:
        repo = ModelRepository(model_repo, EngineSettings(), Metrics())
        await repo.scan()
        await repo.close()
        return repo

    entries = asyncio.run(scan()).entries
    assert entries[("rev", 1)].state == READY
    assert entries[("rev", 2)].state == UNAVAILABLE
    assert entries[("rev", 2)].reason == (
        "manifest says 'rev' version 1, but the bundle lies in rev/2"
        " (export it there, or set name and version in its manifest.json)"
    )
