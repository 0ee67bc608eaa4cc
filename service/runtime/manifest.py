"""The bundle manifest: the contract between ``seqserve export`` and the server.

A bundle is a directory ``<repo>/<model>/<version>/`` holding ``manifest.json``, the
encoder and decoder-step ONNX graphs, the vocabularies (and SentencePiece models), and
optionally a graphone n-gram that re-ranks the beam's n-best list (``rescoring``).
The server trusts nothing it has not checked: every file's sha256, the graphs' input
and output names and element types, and the vocabulary sizes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.text import TokenizerError, TokenizerSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def version_number(name: str) -> int | None:
    """The version a directory name stands for: canonical positive integers only ("01" beside "1", or a non-ASCII
    digit such as U+0661, is no version), so one version has one directory."""
    if name.isascii() and name.isdigit() and name == str(int(name)) and int(name) >= 1:
        return int(name)
    return None


GRAPHS = ("encoder", "decoder_step")


class BundleError(Exception):
    """A bundle is malformed, corrupted or does not match its manifest."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64", "float32"
    shape: tuple[str | int, ...]  # symbolic axis names or fixed sizes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TensorSpec:
        return cls(str(raw["name"]), str(raw["dtype"]), tuple(raw["shape"]))


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GraphSpec:
        return cls(
            str(raw["file"]),
            tuple(TensorSpec.from_dict(t) for t in raw["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in raw["outputs"]),
        )

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class RescoringSpec:
    """How a bundle re-ranks a beam's finished hypotheses: score + weight * graphone log-probability (``floor``
    when the graphone model cannot segment the pair) + length_weight * (tokens + 1)."""

    file: str
    order: int
    weight: float
    length_weight: float
    floor: float
    beam: int  # Viterbi beam per lattice cell of the graphone scorer

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RescoringSpec:
        try:
            spec = cls(
                str(raw["file"]),
                int(raw["order"]),
                float(raw["weight"]),
                float(raw["length_weight"]),
                float(raw["floor"]),
                int(raw["beam"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest.json: rescoring is malformed: {type(exc).__name__}: {exc}") from exc
        finite = all(math.isfinite(v) for v in (spec.weight, spec.length_weight, spec.floor))
        if not finite or spec.weight < 0 or spec.beam < 1 or spec.order < 1:
            raise BundleError("manifest.json: rescoring needs finite weights, weight >= 0, beam >= 1 and order >= 1")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    architecture: dict[str, Any]
    graphs: dict[str, GraphSpec]
    special_tokens: dict[str, int]
    tokenizers: dict[str, TokenizerSpec]
    vocab_sizes: dict[str, int]
    state_names: tuple[str, ...]
    files: dict[str, str]  # file name -> sha256
    opset: int
    max_source_length: int
    default_max_length: int
    onnxruntime_version: str = ""
    parity: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    rescoring: dict[str, Any] = field(default_factory=dict)  # {} or RescoringSpec's fields plus how they were tuned
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "special_tokens": self.special_tokens,
            "tokenizers": {k: t.to_dict() for k, t in self.tokenizers.items()},
            "vocab_sizes": self.vocab_sizes,
            "state_names": list(self.state_names),
            "files": self.files,
            "opset": self.opset,
            "max_source_length": self.max_source_length,
            "default_max_length": self.default_max_length,
            "onnxruntime_version": self.onnxruntime_version,
            "parity": self.parity,
            "quantization": self.quantization,
            "training": self.training,
            "rescoring": self.rescoring,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        if not isinstance(raw, dict):
            raise BundleError("manifest.json must hold a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"manifest format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        try:
            graphs = {k: GraphSpec.from_dict(raw["graphs"][k]) for k in GRAPHS}
            tokenizers = {k: TokenizerSpec.from_dict(raw["tokenizers"][k]) for k in ("src", "tgt")}
            manifest = cls(
                name=str(raw["name"]),
                version=int(raw["version"]),
                architecture=dict(raw["architecture"]),
                graphs=graphs,
                special_tokens={k: int(v) for k, v in raw["special_tokens"].items()},
                tokenizers=tokenizers,
                vocab_sizes={k: int(v) for k, v in raw["vocab_sizes"].items()},
                state_names=tuple(raw["state_names"]),
                files={str(k): str(v) for k, v in raw["files"].items()},
                opset=int(raw["opset"]),
                max_source_length=int(raw["max_source_length"]),
                default_max_length=int(raw["default_max_length"]),
                onnxruntime_version=str(raw.get("onnxruntime_version", "")),
                parity=dict(raw.get("parity", {})),
                quantization=dict(raw.get("quantization", {})),
                training=dict(raw.get("training", {})),
                rescoring=dict(raw.get("rescoring", {})),
            )
        except (KeyError, TypeError, ValueError, TokenizerError) as exc:
            raise BundleError(f"manifest.json is malformed: {type(exc).__name__}: {exc}") from exc
        for key in ("pad", "bos", "eos", "unk"):
            if key not in manifest.special_tokens:
                raise BundleError(f"manifest.json: special_tokens lacks {key!r}")
        if manifest.rescoring:
            RescoringSpec.from_dict(manifest.rescoring)  # checked here, so a bad bundle fails at load
        return manifest

    def summary(self) -> str:
        members = self.architecture.get("ensemble")
        if isinstance(members, list):
            parts = "; ".join(self._describe(m) for m in members if isinstance(m, dict))
            text = f"ensemble of {len(members)} ({self.architecture.get('combine', 'prob')} average): {parts}"
        else:
            text = self._describe(self.architecture)
        if self.rescoring:
            spec = RescoringSpec.from_dict(self.rescoring)
            text += f"; n-best rescored by a graphone {spec.order}-gram (weight {spec.weight:g})"
        return text

    @staticmethod
    def _describe(a: dict[str, Any]) -> str:
        enc = (
            f"{'bi-' if a.get('bidirectional') else ''}{a.get('cell', '?')} {a.get('enc_layers')}x{a.get('enc_hidden')}"
        )
        dec = f"{a.get('dec_layers')}x{a.get('dec_hidden')}"
        extras = [f"attention {a.get('attention')}"]
        if a.get("input_feed"):
            extras.append("input feeding")
        if a.get("reverse_source"):
            extras.append("reversed source")
        if a.get("copy"):
            extras.append("copy")
        if a.get("temperature", 1.0) != 1.0:
            extras.append(f"temperature {a['temperature']:.3g}")
        return f"{enc} -> {dec}, " + ", ".join(extras)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"no {MANIFEST_NAME} in {directory}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(raw)


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Every file the manifest names exists and has the recorded sha256; every file it needs is named."""
    needed = {g.file for g in manifest.graphs.values()}
    if manifest.rescoring:
        needed.add(RescoringSpec.from_dict(manifest.rescoring).file)
    for spec in manifest.tokenizers.values():
        needed.add(spec.vocab)
        if spec.model:
            needed.add(spec.model)
    missing = needed - set(manifest.files)
    if missing:
        raise BundleError(f"manifest.json has no sha256 for {sorted(missing)}")
    for name, expected in sorted(manifest.files.items()):
        if Path(name).name != name:
            raise BundleError(f"file name {name!r} in manifest.json must not contain a path")
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{name} is corrupted: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}..."
            )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
