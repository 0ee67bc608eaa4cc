"""Checkpoint -> bundle: encoder and decoder-step ONNX graphs, vocabularies and a manifest.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` at opset 17. With
torch 2.13 it turns ``pack_padded_sequence`` + ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` into ONNX
``LSTM`` / ``GRU`` / ``RNN`` ops with ``sequence_lens`` (exact on padded rows) and keeps batch
and source-length axes dynamic. The dynamo exporter fails on the packed encoder (see
docs/export.md). The TorchScript exporter drops graph inputs a graph does not use (``step``
when no local attention, ``feed`` without input feeding...), so the manifest records the
inputs each graph really has and the runtime feeds exactly those.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import Tensor, nn

from service.runtime.manifest import GraphSpec, Manifest, TensorSpec, sha256_file, write_manifest
from service.text import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from training.config import Config
from training.model import StepModel

OPSET = 17
ONNX_DTYPES = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32"}


class ExportError(Exception):
    """Export failed (graph check or parity); the message says what and why."""


class EncoderGraph(nn.Module):
    def __init__(self, model: StepModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_len: Tensor) -> tuple[Tensor, ...]:
        memory, states = self.model.encode(src, src_len)
        return (memory, *states)


class StepGraph(nn.Module):
    """Decoder step with a flat signature: tokens, feed, memory, src_len, step, [src_ext], states..."""

    def __init__(self, model: StepModel) -> None:
        super().__init__()
        self.model = model
        self.n_states = len(model.state_names)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        tokens, feed, memory, src_len, step = inputs[:5]
        rest = list(inputs[5:])
        src_ext = rest.pop(0) if self.model.uses_copy else None
        log_probs, states, feed_out, attention, position = self.model.step(
            tokens, rest, feed, memory, src_len, step, src_ext
        )
        outputs = [log_probs, *states, feed_out, attention]
        if self.model.emits_position:
            outputs.append(position)
        return tuple(outputs)


def step_io_names(model: StepModel) -> tuple[list[str], list[str]]:
    inputs = ["tokens", "feed", "memory", "src_len", "step"]
    if model.uses_copy:
        inputs.append("src_ext")
    inputs += [f"state_{s}" for s in model.state_names]
    outputs = ["log_probs", *[f"state_{s}_out" for s in model.state_names], "feed_out", "attention"]
    if model.emits_position:
        outputs.append("position")
    return inputs, outputs


def graph_spec(path: Path) -> GraphSpec:
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(values: Any) -> tuple[TensorSpec, ...]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
            out.append(TensorSpec(v.name, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape))
        return tuple(out)

    return GraphSpec(path.name, spec(graph.input), spec(graph.output))


def example_inputs(model: StepModel, src: Tensor, src_len: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Encoder and step example inputs from a real batch (lengths must differ across rows)."""
    with torch.no_grad():
        memory, states = model.encode(src, src_len)
    n = src.size(0)
    step_args: list[Tensor] = [
        torch.full((n,), BOS_ID, dtype=torch.long),
        torch.zeros(n, model.feed_size),
        memory,
        src_len,
        torch.arange(n, dtype=torch.long),
    ]
    if model.uses_copy:
        step_args.append(src.clone())
    step_args.extend(states)
    return (src, src_len), tuple(step_args)


def export_graphs(model: StepModel, src: Tensor, src_len: Tensor, out_dir: Path) -> dict[str, GraphSpec]:
    model.eval()
    enc_args, step_args = example_inputs(model, src, src_len)
    l_axis = {1: "N"}
    enc_outputs = ["memory", *[f"state_{s}" for s in model.state_names]]
    enc_axes: dict[str, dict[int, str]] = {"src": {0: "B", 1: "S"}, "src_len": {0: "B"}, "memory": {0: "B", 1: "S"}}
    enc_axes.update({f"state_{s}": {1: "B"} for s in model.state_names})
    step_in, step_out = step_io_names(model)
    step_axes: dict[str, dict[int, str]] = {
        "tokens": {0: "N"},
        "feed": {0: "N"},
        "memory": {0: "N", 1: "S"},
        "src_len": {0: "N"},
        "step": {0: "N"},
        "src_ext": {0: "N", 1: "S"},
        "log_probs": {0: "N", 1: "V"},
        "feed_out": {0: "N"},
        "attention": {0: "N", 1: "S"},
        "position": {0: "N"},
    }
    for s in model.state_names:
        step_axes[f"state_{s}"] = l_axis
        step_axes[f"state_{s}_out"] = l_axis
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            EncoderGraph(model).eval(),
            enc_args,
            str(out_dir / "encoder.onnx"),
            input_names=["src", "src_len"],
            output_names=enc_outputs,
            dynamic_axes=enc_axes,
            opset_version=OPSET,
            dynamo=False,
        )
        torch.onnx.export(
            StepGraph(model).eval(),
            step_args,
            str(out_dir / "decoder_step.onnx"),
            input_names=step_in,
            output_names=step_out,
            dynamic_axes={k: v for k, v in step_axes.items() if k in step_in + step_out},
            opset_version=OPSET,
            dynamo=False,
        )
    model.eval()  # the exporter restores the wrappers' mode on exit; keep the model in eval mode regardless
    specs = {}
    for key, file in (("encoder", "encoder.onnx"), ("decoder_step", "decoder_step.onnx")):
        try:
            onnx.checker.check_model(str(out_dir / file), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"onnx.checker rejected {file}: {exc}") from exc
        specs[key] = graph_spec(out_dir / file)
    return specs


def write_bundle(
    model: StepModel,
    cfg: Config,
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    files: dict[str, bytes],
    example_src: Tensor,
    example_len: Tensor,
    out_dir: Path,
    name: str,
    version: int,
    training_info: dict[str, Any],
) -> Manifest:
    """Export graphs and vocabularies into ``out_dir`` and write a manifest (parity filled in later)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs = export_graphs(model, example_src, example_len, out_dir)
    src_tok.vocab.save(out_dir / src_tok.spec.vocab)
    tgt_tok.vocab.save(out_dir / tgt_tok.spec.vocab)
    for fname, data in files.items():
        (out_dir / fname).write_bytes(data)
    return make_manifest(model, cfg, src_tok, tgt_tok, graphs, out_dir, name, version, training_info)


def make_manifest(
    model: StepModel,
    cfg: Config,
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    graphs: dict[str, GraphSpec],
    out_dir: Path,
    name: str,
    version: int,
    training_info: dict[str, Any],
    parity: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    ort_version: str = "",
) -> Manifest:
    names = sorted(
        {g.file for g in graphs.values()}
        | {src_tok.spec.vocab, tgt_tok.spec.vocab}
        | {s.model for s in (src_tok.spec, tgt_tok.spec) if s.model}
    )
    manifest = Manifest(
        name=name,
        version=version,
        architecture=model.architecture(),
        graphs=graphs,
        special_tokens={"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID},
        tokenizers={"src": src_tok.spec, "tgt": tgt_tok.spec},
        vocab_sizes={"src": len(src_tok.vocab), "tgt": len(tgt_tok.vocab)},
        state_names=tuple(model.state_names),
        files={n: sha256_file(out_dir / n) for n in names},
        opset=OPSET,
        max_source_length=cfg.data.max_src_len,
        default_max_length=cfg.data.max_tgt_len,
        onnxruntime_version=ort_version,
        parity=parity or {},
        quantization=quantization or {},
        training=training_info,
    )
    write_manifest(out_dir, manifest)
    return manifest


def atomic_bundle_dir(target: Path) -> tuple[Path, Path]:
    """A temporary sibling directory to build in; moved into place only when export succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    return tmp, target


def publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp)
            raise ExportError(f"{target} exists; pass --overwrite to replace it")
        shutil.rmtree(target)
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the server's user
    tmp.rename(target)
