"""The live model repository: ``<repo>/<model>/<version>/`` bundles, loaded, polled and swapped.

Every version is verified before it serves (manifest, sha256 of every file, graph inputs and
outputs). A version that fails is logged with the model, version and reason, reported as
UNAVAILABLE, and never takes traffic; the others keep serving. A version whose files change
on disk is reloaded; if the new copy is refused the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from service.engine.engine import EnginePool
from service.engine.scheduler import EngineSettings
from service.errors import InvalidArgument, NotFound, Unavailable
from service.metrics import Metrics
from service.runtime.bundle import Bundle
from service.runtime.manifest import MANIFEST_NAME, BundleError, version_number

log = logging.getLogger(__name__)

READY, UNAVAILABLE, UNLOADED = "READY", "UNAVAILABLE", "UNLOADED"
MAX_NAME_LENGTH = 200


@dataclass
class VersionEntry:
    name: str
    version: int
    state: str
    reason: str = ""
    engine: EnginePool | None = None
    fingerprint: tuple[tuple[str, int, int], ...] = ()

    @property
    def bundle(self) -> Bundle | None:
        return None if self.engine is None else self.engine.bundle


def fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of every file: cheap change detection between polls."""
    out = []
    for path in sorted(directory.iterdir()):
        with contextlib.suppress(OSError):
            if path.is_file():
                st = path.stat()
                out.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def version_dirs(model_dir: Path) -> dict[int, Path]:
    out = {}
    for child in model_dir.iterdir():
        version = version_number(child.name)
        if version is not None and child.is_dir() and (child / MANIFEST_NAME).exists():
            out[version] = child
    return out


def check_name(name: str) -> None:
    """A model name a request may carry (INVALID_ARGUMENT otherwise; whether it exists is NOT_FOUND's business)."""
    if not name:
        raise InvalidArgument("the request names no model; see ListModels")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"model names are at most {MAX_NAME_LENGTH} characters")


class ModelRepository:
    def __init__(
        self, root: Path, settings: EngineSettings, metrics: Metrics, threads: int = 1, device: str = "cpu"
    ) -> None:
        self.root = root
        self.settings = settings
        self.metrics = metrics
        self.threads = threads
        self.device = device
        self.entries: dict[tuple[str, int], VersionEntry] = {}
        self.unloaded: set[str] = set()
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lookups
    def get(self, name: str, version: int = 0) -> VersionEntry:
        check_name(name)
        versions = {v: e for (n, v), e in self.entries.items() if n == name}
        if not versions or name in self.unloaded:
            raise NotFound(f"no model named {name!r}; see ListModels")
        if version:
            entry = versions.get(version)
            if entry is None:
                raise NotFound(f"model {name!r} has no version {version} (versions: {sorted(versions)})")
            if entry.engine is None:
                raise Unavailable(f"model {name!r} version {version} is not ready: {entry.reason or entry.state}")
            return entry
        ready = [e for v, e in sorted(versions.items()) if e.engine is not None]
        if not ready:
            raise Unavailable(f"model {name!r} has no ready version")
        return ready[-1]

    def versions(self) -> list[VersionEntry]:
        return [self.entries[k] for k in sorted(self.entries)]

    # ------------------------------------------------------------------ loading
    async def scan(self, only: str | None = None) -> None:
        """Load new and changed versions from disk (all models, or one)."""
        async with self._lock:
            if not self.root.is_dir():
                log.error("model repository %s is not a directory", self.root)
                return
            for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                name = model_dir.name
                if (only is not None and name != only) or (only is None and name in self.unloaded):
                    continue
                for version, vdir in sorted(version_dirs(model_dir).items()):
                    await self._load_version(name, version, vdir)

    async def _load_version(self, name: str, version: int, vdir: Path) -> None:
        key = (name, version)
        entry = self.entries.get(key)
        fp = fingerprint(vdir)
        if entry is not None and entry.fingerprint == fp:
            return
        try:
            bundle = await asyncio.to_thread(Bundle, vdir, self.threads, self.device)
            if bundle.name != name or bundle.version != version:
                raise BundleError(
                    f"manifest says {bundle.name!r} version {bundle.version}, but the bundle lies in {name}/{version}"
                    " (export it there, or set name and version in its manifest.json)"
                )
        except BundleError as exc:
            self._refuse(key, fp, str(exc))
            return
        except Exception as exc:  # anything else while loading: refuse, never crash the server
            log.exception("model %s version %d: unexpected error while loading", name, version)
            self._refuse(key, fp, f"failed to load ({type(exc).__name__})")
            return
        engine = await asyncio.to_thread(EnginePool, bundle, self.settings, self.metrics, self.threads, self.device)
        engine.start()
        old = entry.engine if entry is not None else None
        self.entries[key] = VersionEntry(name, version, READY, "", engine, fp)
        self.metrics.model_ready.labels(name, str(version)).set(1)
        log.info("model %s version %d ready (%s)", name, version, bundle.manifest.summary())
        if old is not None:
            await old.close()

    def _refuse(self, key: tuple[str, int], fp: tuple[tuple[str, int, int], ...], reason: str) -> None:
        name, version = key
        entry = self.entries.get(key)
        if entry is not None and entry.engine is not None:
            log.error(
                "model %s version %d: the changed copy on disk is refused (%s); the loaded copy keeps serving",
                name,
                version,
                reason,
            )
            entry.reason = f"a changed copy on disk was refused: {reason}"
            entry.fingerprint = fp
            return
        log.error("model %s version %d refused: %s", name, version, reason)
        self.entries[key] = VersionEntry(name, version, UNAVAILABLE, reason, None, fp)
        self.metrics.model_ready.labels(name, str(version)).set(0)

    async def load_model(self, name: str) -> list[VersionEntry]:
        check_name(name)
        try:
            found = (self.root / name).is_dir()
        except OSError:  # e.g. a name the file system cannot hold
            found = False
        if not found:
            raise NotFound(f"no directory {name!r} in the model repository")
        self.unloaded.discard(name)
        await self.scan(only=name)
        return [e for (n, _), e in sorted(self.entries.items()) if n == name]

    async def unload_model(self, name: str) -> None:
        check_name(name)
        entries = [e for (n, _), e in self.entries.items() if n == name]
        if not entries or name in self.unloaded:
            raise NotFound(f"no loaded model named {name!r}")
        self.unloaded.add(name)
        async with self._lock:
            for e in entries:
                engine, e.engine = e.engine, None
                e.state, e.reason, e.fingerprint = UNLOADED, "unloaded through the API", ()
                self.metrics.model_ready.labels(e.name, str(e.version)).set(0)
                if engine is not None:
                    await engine.close()
        log.info("model %s unloaded", name)

    async def poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.scan()
            except Exception:
                log.exception("model repository poll failed")

    async def close(self) -> None:
        engines = [e.engine for e in self.entries.values() if e.engine is not None]
        await asyncio.gather(*(engine.close() for engine in engines))
