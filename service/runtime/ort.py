"""onnxruntime sessions of one bundle: the only module that imports onnxruntime.

``encode`` and ``step`` take and return plain numpy arrays; the graphs' input and output
names come from the manifest, which was checked against the sessions when they were built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.runtime.manifest import BundleError, GraphSpec, Manifest

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}


@dataclass
class StepOutput:
    log_probs: FloatArray  # [N, V']
    states: list[FloatArray]  # each [L, N, H]
    feed: FloatArray  # [N, H]
    attention: FloatArray  # [N, S]


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning(
            "--device cuda: onnxruntime has no CUDAExecutionProvider here (available: %s); using the CPU",
            ", ".join(available),
        )
    return ["CPUExecutionProvider"]


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def check_io(name: str, session: ort.InferenceSession, spec: GraphSpec) -> None:
    """The session's inputs and outputs are exactly the manifest's, with the same element types."""
    for kind, actual, expected in (
        ("inputs", session.get_inputs(), spec.inputs),
        ("outputs", session.get_outputs(), spec.outputs),
    ):
        got = {a.name: a.type for a in actual}
        want = {e.name: ORT_TYPES.get(e.dtype, e.dtype) for e in expected}
        if got != want:
            raise BundleError(f"{name} graph {kind} do not match the manifest: graph has {got}, manifest says {want}")


class Runtime:
    """The encoder and decoder-step sessions of one bundle."""

    def __init__(self, directory: Path, manifest: Manifest, threads: int = 1, device: str = "cpu") -> None:
        self.manifest = manifest
        providers = providers_for(device)
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        sessions = {}
        for key, spec in manifest.graphs.items():
            try:
                sess = ort.InferenceSession(str(directory / spec.file), session_options(threads), providers=providers)
            except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
                raise BundleError(f"onnxruntime cannot load {spec.file}: {type(exc).__name__}") from exc
            check_io(key, sess, spec)
            sessions[key] = sess
        self._encoder = sessions["encoder"]
        self._step = sessions["decoder_step"]
        self._step_inputs = set(manifest.graphs["decoder_step"].input_names())
        self._step_outputs = manifest.graphs["decoder_step"].output_names()
        self._enc_outputs = manifest.graphs["encoder"].output_names()
        self.state_names = manifest.state_names
        self._state_inputs = [f"state_{n}" for n in self.state_names]
        position = {name: i for i, name in enumerate(self._step_outputs)}
        wanted = ["log_probs", "feed_out", "attention", *(f"state_{n}_out" for n in self.state_names)]
        missing = [name for name in wanted if name not in position]
        if missing:
            raise BundleError(f"the decoder_step graph lacks the outputs {', '.join(missing)}")
        self._out_log_probs, self._out_feed = position["log_probs"], position["feed_out"]
        self._out_attention = position["attention"]
        self._out_states = [position[f"state_{n}_out"] for n in self.state_names]
        arch = manifest.architecture
        feed_size = arch.get("feed_size", arch.get("dec_hidden"))  # width of h~ (an ensemble's: all members')
        if not isinstance(feed_size, int) or feed_size < 1:
            raise BundleError("manifest.json: the architecture lacks a positive integer feed_size or dec_hidden")
        self.feed_size = feed_size
        self.copy = bool(arch.get("copy", False))
        self.tgt_vocab = manifest.vocab_sizes["tgt"]

    def encode(self, src: IntArray, src_len: IntArray) -> tuple[FloatArray, list[FloatArray]]:
        """src [B, S], src_len [B] -> memory [B, S, M], initial states (each [L, B, H])."""
        out = self._encoder.run(self._enc_outputs, {"src": src, "src_len": src_len})
        named = dict(zip(self._enc_outputs, out, strict=True))
        return named["memory"], [named[f"state_{s}"] for s in self.state_names]

    def step(
        self,
        tokens: IntArray,
        states: list[FloatArray],
        feed: FloatArray,
        memory: FloatArray,
        src_len: IntArray,
        step: IntArray,
        src_ext: IntArray | None = None,
    ) -> StepOutput:
        """One decoder step for N rows; see ``training.model.Seq2Seq.step``."""
        values: dict[str, npt.NDArray[np.generic]] = {
            "tokens": tokens,
            "feed": feed,
            "memory": memory,
            "src_len": src_len,
            "step": step,
        }
        if src_ext is not None:
            values["src_ext"] = src_ext
        values.update(zip(self._state_inputs, states, strict=True))
        feeds = {k: v for k, v in values.items() if k in self._step_inputs}
        out = self._step.run(self._step_outputs, feeds)
        return StepOutput(
            log_probs=out[self._out_log_probs],
            states=[out[i] for i in self._out_states],
            feed=out[self._out_feed],
            attention=out[self._out_attention],
        )

    def initial_feed(self, rows: int) -> FloatArray:
        return np.zeros((rows, self.feed_size), dtype=np.float32)
