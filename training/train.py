"""The training loop: teacher forcing, clipping, plateau decay, early stopping, resumable checkpoints.

Run directory layout (``--out DIR``)::

    config.json      the resolved configuration
    metrics.jsonl    one JSON object per log line (train steps and dev evaluations)
    last.pt          the latest checkpoint (resume point, written every few minutes and each epoch)
    best.pt          the checkpoint with the best dev ``train.select_on`` metric so far (what ``seqserve export`` takes)
    epoch-NNN.pt     weights after epoch NNN, the last ``train.keep_checkpoints`` of them (``seqserve average``)
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pickle
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from service.text import SPECIALS, Tokenizer, TokenizerSpec, Vocab, extend_source, ids_to_tokens
from training.average import model_settings, slim_checkpoint
from training.config import Config, ConfigError, DataConfig, config_from_dict
from training.data import (
    Batch,
    DataError,
    Example,
    batches,
    cmudict_path,
    distillation_pairs,
    file_sha256,
    make_batch,
    read_cmudict,
    read_tsv,
    reverse_task,
    training_pairs,
)
from training.decode import beam_search
from training.evaluate import evaluate_hypotheses
from training.model import Seq2Seq, StepModel, count_parameters, nll_loss, soft_cross_entropy
from training.teacher import Teacher, teacher_paths

CHECKPOINT_FORMAT = 1
# model settings that may differ from train.init_from's: no weight's shape or meaning depends on them
FREE = ("dropout", "emb_dropout", "temperature", "forget_bias")
MAX_UNKNOWN_TARGETS = 0.01  # fine-tuning: share of target tokens outside the checkpoint's vocabulary tolerated


def _most_common(counts: Mapping[str, int], shown: int = 10) -> str:
    return ", ".join(f"{t!r} x{n}" for t, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:shown])


@dataclass
class DataSets:
    train: list[Example]
    dev: list[Example]
    source: dict[str, str]  # provenance: name, file, sha256


def load_datasets(cfg: DataConfig, seed: int) -> DataSets:
    if cfg.dataset == "cmudict":
        path = Path(cfg.cmudict_file) if cfg.cmudict_file else cmudict_path()
        splits = read_cmudict(path)
        return DataSets(
            splits["train"], splits["dev"], {"name": "cmudict", "file": path.name, "sha256": file_sha256(path)}
        )
    if cfg.dataset == "reverse":
        train = reverse_task(cfg.synthetic_size, seed)
        dev = reverse_task(max(cfg.synthetic_size // 10, 20), seed + 1)
        return DataSets(train, dev, {"name": "reverse", "file": "", "sha256": ""})
    if cfg.dataset == "tsv":
        if not cfg.train or not cfg.dev:
            raise DataError("dataset = 'tsv' needs data.train and data.dev paths")
        return DataSets(
            read_tsv(cfg.train),
            read_tsv(cfg.dev),
            {"name": "tsv", "file": cfg.train, "sha256": file_sha256(Path(cfg.train))},
        )
    raise DataError(f"unknown data.dataset {cfg.dataset!r}: use cmudict, reverse or tsv")


def _spec(kind: str, side: str, lowercase: bool) -> TokenizerSpec:
    model = f"{side}_spm.model" if kind == "sentencepiece" else None
    return TokenizerSpec(kind=kind, vocab=f"{side}_vocab.txt", lowercase=lowercase, model=model)


def train_sentencepiece(texts: Sequence[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        bos_id=-1,
        eos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return buf.getvalue()


def build_tokenizers(cfg: DataConfig, data: DataSets) -> tuple[Tokenizer, Tokenizer, dict[str, bytes]]:
    """Tokenizers with vocabularies built from the training data only."""
    lowercase = cfg.dataset == "cmudict"
    src_texts = [ex.src for ex in data.train]
    tgt_texts = [ref for ex in data.train for ref in ex.refs]
    files: dict[str, bytes] = {}
    sides = {}
    for side, kind, texts in (("src", cfg.src_tokenizer, src_texts), ("tgt", cfg.tgt_tokenizer, tgt_texts)):
        spec = _spec(kind, side, lowercase and side == "src")
        sp_model = None
        if kind == "sentencepiece":
            assert spec.model is not None
            files[spec.model] = train_sentencepiece(texts, cfg.sp_vocab_size)
            import sentencepiece as spm

            sp_model = spm.SentencePieceProcessor(model_proto=files[spec.model])
        tok = Tokenizer(spec, Vocab(list(SPECIALS)), sp_model)
        sides[side] = (spec, sp_model, [tok.tokenize(t) for t in texts])
    if cfg.shared_vocab:
        vocab = Vocab.build([*sides["src"][2], *sides["tgt"][2]])
        vocabs = {"src": vocab, "tgt": vocab}
    else:
        vocabs = {side: Vocab.build(v[2]) for side, v in sides.items()}
    src = Tokenizer(sides["src"][0], vocabs["src"], sides["src"][1])
    tgt = Tokenizer(sides["tgt"][0], vocabs["tgt"], sides["tgt"][1])
    return src, tgt, files


def tokenizers_from_checkpoint(ckpt: dict[str, Any]) -> tuple[Tokenizer, Tokenizer]:
    out = []
    for side in ("src", "tgt"):
        spec = TokenizerSpec.from_dict(ckpt["tokenizers"][side])
        sp_model = None
        if spec.kind == "sentencepiece":
            import sentencepiece as spm

            assert spec.model is not None
            sp_model = spm.SentencePieceProcessor(model_proto=ckpt["files"][spec.model])
        out.append(Tokenizer(spec, Vocab(ckpt["vocabs"][side]), sp_model))
    return out[0], out[1]


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[Seq2Seq, Config, Tokenizer, Tokenizer]:
    cfg = config_from_dict(ckpt["config"])
    src_tok, tgt_tok = tokenizers_from_checkpoint(ckpt)
    model = Seq2Seq(cfg.model, len(src_tok.vocab), len(tgt_tok.vocab))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, cfg, src_tok, tgt_tok


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:  # not a torch file, truncated, corrupted zip
        raise ValueError(f"{path}: not a readable seqserve checkpoint ({type(exc).__name__})") from exc
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a seqserve checkpoint (format {found!r})")
    state = ckpt.get("state", {})
    if "best_wer" in state:  # written before train.select_on existed: its best was chosen on dev WER
        state["best_score"] = state.pop("best_wer")
    return ckpt


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """torch.save through a temporary file beside ``path``: a reader never sees a half-written checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a GPU or on a CPU-only build
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(
                f"train.device={name}: torch {torch.__version__} ({build}) sees no CUDA device; "
                "use train.device=auto or cpu"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device={name}: torch sees {count} CUDA device(s), numbered from 0")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def mean_token_nll(model: Seq2Seq, data: Iterable[Batch], device: torch.device | None = None) -> float:
    """Teacher-forced negative log-likelihood per target token over batches (eval mode; moved to ``device``)."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in data:
        b = batch if device is None else batch.to(device)
        log_probs = model(b.src, b.src_len, b.tgt_in, b.src_ext)
        total += float(nll_loss(log_probs, b.tgt_out, 0)) * b.n_tokens
        tokens += b.n_tokens
    return total / max(tokens, 1)


def decode_scored(
    model: StepModel,
    examples: Sequence[Example],
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    device: torch.device,
    beam: int = 1,
    batch_size: int = 256,
    max_len: int = 50,
    length_penalty: str = "none",
    alpha: float = 0.0,
    progress: bool = False,
) -> list[tuple[list[str], float]]:
    """Best hypothesis of each example and its log-probability (-inf when the search found none)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].src))
    out: list[tuple[list[str], float]] = [([], -math.inf) for _ in examples]
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="decode", disable=not progress, unit="batch"):
        idx = order[start : start + batch_size]
        batch = make_batch([(examples[i].src, "") for i in idx], src_tok, tgt_tok, model.uses_copy).to(device)
        hyps = beam_search(
            model,
            batch.src,
            batch.src_len,
            beam=beam,
            n_best=1,
            max_len=max_len,
            length_penalty=length_penalty,
            alpha=alpha,
            src_ext=batch.src_ext,
        )
        for i, h in zip(idx, hyps, strict=True):
            if h:
                out[i] = (output_tokens(h[0].tokens, tgt_tok, src_tok.tokenize(examples[i].src)), h[0].log_prob)
    return out


def output_tokens(ids: Sequence[int], tgt_tok: Tokenizer, src_tokens: Sequence[str]) -> list[str]:
    """Target token strings; extended (copied) ids map back to their source token."""
    oov = extend_source(src_tokens, tgt_tok.vocab)[1] if any(i >= len(tgt_tok.vocab) for i in ids) else []
    return ids_to_tokens(ids, tgt_tok.vocab, oov)


class Trainer:
    def __init__(self, cfg: Config, out_dir: Path) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(cfg.train.device)
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed)
        self.data = load_datasets(cfg.data, cfg.train.seed)
        self.init_ckpt = self._init_checkpoint(Path(cfg.train.init_from)) if cfg.train.init_from else None
        if self.init_ckpt is not None:  # fine-tuning: the checkpoint's tokenizers, not ones built from this data
            self.src_tok, self.tgt_tok = tokenizers_from_checkpoint(self.init_ckpt)
            self.files = dict(self.init_ckpt.get("files", {}))
        else:
            self.src_tok, self.tgt_tok, self.files = build_tokenizers(cfg.data, self.data)
        if cfg.data.distill:  # a teacher's outputs as targets; tokenizers still from the data set's references
            pairs = distillation_pairs(cfg.data.distill, self.data.train)
            self.data.source["distill"] = Path(cfg.data.distill).name
            self.data.source["distill_sha256"] = file_sha256(Path(cfg.data.distill))
        else:
            pairs = training_pairs(self.data.train)
        # the served model refuses longer sources and stops at max_tgt_len: train within the same bounds
        self.pairs = [
            p
            for p in pairs
            if len(self.src_tok.tokenize(p[0])) <= cfg.data.max_src_len
            and len(self.tgt_tok.tokenize(p[1])) < cfg.data.max_tgt_len
        ]
        self.dropped_pairs = len(pairs) - len(self.pairs)
        self.unknown = self._unknown_tokens() if self.init_ckpt is not None else {"src": {}, "tgt": {}}
        self.model = Seq2Seq(cfg.model, len(self.src_tok.vocab), len(self.tgt_tok.vocab)).to(self.device)
        self.teacher: Teacher | None = None
        if cfg.train.teacher:  # word-level distillation: the teacher's distributions as soft targets
            self.teacher = Teacher(
                teacher_paths(cfg.train.teacher), self.tokenization(), cfg.model.copy, self.device, cfg.train.kd_top_k
            )
            self.data.source["teacher"] = ",".join(Path(p).name for p in self.teacher.paths)
            self.data.source["teacher_sha256"] = ",".join(self.teacher.sha256)
        self.wrapped: nn.Module = self.model
        if self.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = self._optimizer()
        self.state: dict[str, Any] = {
            "epoch": 0,
            "batch_in_epoch": 0,
            "step": 0,
            "best_score": math.inf,  # the best dev value of train.select_on so far
            "select_on": cfg.train.select_on,
            "bad_epochs": 0,
            "lr": cfg.train.lr,
            "finished": False,
        }
        self.is_main = self.rank == 0

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        params = self.model.parameters()
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
        raise ConfigError(f"train.optimizer must be 'adam' or 'sgd', got {t.optimizer!r}")

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "state": dict(self.state),
            **self.tokenization(),
            "data": self.data.source,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def tokenization(self) -> dict[str, Any]:
        """How this run tokenizes, as a checkpoint records it: ``vocabs``, ``tokenizers``, ``files``."""
        return {
            "vocabs": {"src": self.src_tok.vocab.itos, "tgt": self.tgt_tok.vocab.itos},
            "tokenizers": {"src": self.src_tok.spec.to_dict(), "tgt": self.tgt_tok.spec.to_dict()},
            "files": self.files,
        }

    def save(self, name: str) -> None:
        if not self.is_main:
            return
        save_checkpoint(self.checkpoint(), self.out_dir / name)

    def resume(self) -> bool:
        path = self.out_dir / "last.pt"
        if not path.is_file():
            return False
        ckpt = load_checkpoint(path)
        if ckpt["vocabs"]["src"] != self.src_tok.vocab.itos or ckpt["vocabs"]["tgt"] != self.tgt_tok.vocab.itos:
            raise ConfigError(f"{path} was trained with other vocabularies; use a new --out directory")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state = dict(ckpt["state"])
        if self.state.get("select_on", "wer") != self.cfg.train.select_on:  # another metric: its best starts afresh
            self.state.update(select_on=self.cfg.train.select_on, best_score=math.inf, bad_epochs=0)
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        return True

    def _init_checkpoint(self, path: Path) -> dict[str, Any]:
        """``train.init_from``, read once; its architecture must be this config's (sizes, cell, attention...)."""
        if not path.is_file():
            raise ConfigError(f"train.init_from: {path} not found")
        try:
            ckpt = load_checkpoint(path)
        except ValueError as exc:
            raise ConfigError(f"train.init_from: {exc}") from exc
        theirs, ours = model_settings(ckpt), dataclasses.asdict(self.cfg.model)
        differ = [f"{k} {theirs[k]!r} (here {v!r})" for k, v in ours.items() if k not in FREE and theirs[k] != v]
        if differ:
            raise ConfigError(
                f"train.init_from: {path} has another architecture: {', '.join(differ)}; set the same with --set"
                " model.KEY=VALUE"
            )
        return ckpt

    def _unknown_tokens(self) -> dict[str, dict[str, int]]:
        """Fine-tuning keeps the checkpoint's vocabularies; the training data's tokens outside them, per side (a copy
        model's target tokens that its source holds are not: it copies them). Sources read them as <unk>, as the
        server does; targets with more than MAX_UNKNOWN_TARGETS of them are refused (another token set: the model
        would learn to write <unk>)."""
        unknown: dict[str, Counter[str]] = {"src": Counter(), "tgt": Counter()}
        targets = 0
        for src_text, tgt_text in self.pairs:
            src = self.src_tok.tokenize(src_text)
            tgt = self.tgt_tok.tokenize(tgt_text)
            targets += len(tgt)
            copyable = set(src) if self.cfg.model.copy else set()
            unknown["src"].update(t for t in src if t not in self.src_tok.vocab.stoi)
            unknown["tgt"].update(t for t in tgt if t not in self.tgt_tok.vocab.stoi and t not in copyable)
        share = sum(unknown["tgt"].values()) / max(targets, 1)
        if share > MAX_UNKNOWN_TARGETS:
            raise ConfigError(
                f"train.init_from: {100 * share:.1f}% of the training targets' tokens are not in the checkpoint's"
                f" vocabulary ({_most_common(unknown['tgt'])}); fine-tuning keeps its vocabularies: map them to known"
                " tokens, or train from scratch without init_from"
            )
        return {side: dict(counts) for side, counts in unknown.items()}

    def init_weights(self, path: Path) -> None:
        """Load ``train.init_from`` (read and checked in ``__init__``, which took its tokenizers too)."""
        ckpt = self.init_ckpt
        assert ckpt is not None, "init_weights runs only when train.init_from is set"
        self.model.load_state_dict(ckpt["model"])
        self.log({"event": "init_from", "path": str(path), "steps_before": ckpt["state"]["step"]})
        for side, read in (("src", "are read as <unk>"), ("tgt", "are learned as <unk>")):
            counts = self.unknown[side]
            if counts and self.is_main:
                what = "source" if side == "src" else "target"
                print(
                    f"seqserve train: {sum(counts.values())} {what} token(s) of the training data are not in"
                    f" {path.name}'s vocabulary and {read}: {_most_common(counts)}",
                    flush=True,
                )
                self.log({"event": f"unknown_{what}_tokens", "tokens": counts})

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------ steps
    def train_step(self, batch: Batch) -> tuple[float, float]:
        """One optimisation step; returns (loss, gradient norm before clipping)."""
        self.wrapped.train()
        batch = batch.to(self.device)
        log_probs = self.wrapped(batch.src, batch.src_len, batch.tgt_in, batch.src_ext)
        loss = nll_loss(log_probs, batch.tgt_out, pad_id=0, label_smoothing=self.cfg.train.label_smoothing)
        if self.teacher is not None:
            ids, probs = self.teacher.targets(batch)
            kd = soft_cross_entropy(log_probs, ids, probs, batch.tgt_out, pad_id=0)
            weight = self.cfg.train.kd_weight
            loss = (1.0 - weight) * loss + weight * kd
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_norm)
        self.optimizer.step()
        self.state["step"] += 1
        return float(loss.item()), float(norm)

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        return batches(
            self.pairs,
            self.cfg.train.batch_size,
            self.src_tok,
            self.tgt_tok,
            self.cfg.model.copy,
            seed=self.cfg.train.seed * 1000 + epoch,
            rank=self.rank,
            world=self.world,
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        dev = self.data.dev
        pairs = training_pairs(dev)
        dev_batches = batches(pairs, 256, self.src_tok, self.tgt_tok, self.cfg.model.copy, seed=0, shuffle=False)
        out = {"dev_loss": mean_token_nll(self.model, dev_batches, self.device)}
        scored = decode_scored(
            self.model,
            dev,
            self.src_tok,
            self.tgt_tok,
            self.device,
            beam=self.cfg.train.eval_beam,
            max_len=self.cfg.data.max_tgt_len,
        )
        hyps = [tokens for tokens, _ in scored]
        refs = [[self.tgt_tok.tokenize(r) for r in ex.refs] for ex in dev]
        out.update(evaluate_hypotheses(hyps, [lp for _, lp in scored], refs, prefix="dev_"))
        return out

    def set_lr(self, lr: float) -> None:
        self.state["lr"] = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def run(self, resume: bool = True, progress: bool = True) -> dict[str, Any]:
        t = self.cfg.train
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        resumed = resume and self.resume()
        if not resumed and t.init_from:
            self.init_weights(Path(t.init_from))
        if self.world > 1:
            dist.barrier()
        if self.is_main:
            print(
                f"seqserve train: {count_parameters(self.model):,} parameters, {len(self.pairs):,} training pairs "
                f"({self.dropped_pairs} longer than the length limits left out), "
                f"device {self.device}, world {self.world}"
                + (f", resumed at step {self.state['step']}" if resumed else ""),
                flush=True,
            )
        started = time.monotonic()
        last_save = started
        stopped = ""  # "max_steps" / "max_minutes": paused mid-epoch, resumable at the next batch
        while not stopped and not self.state["finished"] and self.state["epoch"] < t.epochs:
            epoch = self.state["epoch"]
            skip = self.state["batch_in_epoch"]
            n_batches = math.ceil(len(self.pairs) / t.batch_size) // self.world
            bar = tqdm(
                total=n_batches,
                initial=skip,
                desc=f"epoch {epoch + 1}",
                unit="batch",
                disable=not (progress and self.is_main),
                mininterval=2.0,
                dynamic_ncols=True,
            )
            window_tokens, window_start = 0, time.monotonic()
            completed = True
            for i, batch in enumerate(self.epoch_batches(epoch)):
                if i < skip:
                    continue
                loss, norm = self.train_step(batch)
                self.state["batch_in_epoch"] = i + 1
                window_tokens += batch.n_tokens * self.world
                bar.update(1)
                if self.state["step"] % 50 == 0:
                    rate = window_tokens / max(time.monotonic() - window_start, 1e-9)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", lr=f"{self.state['lr']:.2g}")
                    self.log(
                        {
                            "event": "train",
                            "epoch": epoch + 1,
                            "step": self.state["step"],
                            "loss": loss,
                            "grad_norm": norm,
                            "lr": self.state["lr"],
                            "tokens_per_s": rate,
                        }
                    )
                    window_tokens, window_start = 0, time.monotonic()
                now = time.monotonic()
                if now - last_save > 300:
                    self.save("last.pt")
                    last_save = now
                if t.max_steps and self.state["step"] >= t.max_steps:
                    stopped, completed = "max_steps", False
                    break
                if t.max_minutes and now - started > t.max_minutes * 60:
                    stopped, completed = "max_minutes", False
                    break
            bar.close()
            if completed:
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = 0
            self.end_of_epoch(epoch, started, plateau=completed)  # saves last.pt
            last_save = time.monotonic()
        self.check_replicas()
        return {
            "step": self.state["step"],
            "epoch": self.state["epoch"],
            "select_on": self.cfg.train.select_on,
            "best_score": self.state["best_score"],
            "stopped": stopped or ("early_stop" if self.state["finished"] else "epochs"),
        }

    def end_of_epoch(self, epoch: int, started: float, plateau: bool) -> None:
        """Dev evaluation; best.pt on improvement; plateau decay / early stop only after a whole epoch."""
        t = self.cfg.train
        metrics = self.evaluate()
        selected = metrics["dev_loss" if t.select_on == "loss" else f"dev_{t.select_on}"]
        improved = selected < self.state["best_score"]
        if improved:
            self.state["best_score"] = selected
            self.state["bad_epochs"] = 0
        elif plateau:
            self.state["bad_epochs"] += 1
            if self.state["bad_epochs"] % max(t.decay_patience, 1) == 0:
                self.set_lr(max(self.state["lr"] * t.lr_decay, t.min_lr))
            if self.state["bad_epochs"] >= t.early_stop_patience:
                self.state["finished"] = True
        self.log(
            {
                "event": "dev",
                "epoch": epoch + 1,
                "step": self.state["step"],
                "lr": self.state["lr"],
                "wall_s": round(time.monotonic() - started, 1),
                **metrics,
            }
        )
        if self.is_main:
            print(
                f"epoch {epoch + 1}{'' if plateau else ' (paused)'}: dev loss {metrics['dev_loss']:.4f}  "
                f"WER {100 * metrics['dev_wer']:.2f}%  (no stress {100 * metrics['dev_nostress_wer']:.2f}%)  "
                f"lr {self.state['lr']:.2g}" + ("  *best*" if improved else ""),
                flush=True,
            )
        if improved:
            self.save("best.pt")
        if plateau and t.keep_checkpoints > 0:
            self.save_epoch(epoch + 1, t.keep_checkpoints)
        self.save("last.pt")

    def save_epoch(self, epoch: int, keep: int) -> None:
        """Weights after a whole epoch as epoch-NNN.pt; only the newest ``keep`` of them stay."""
        if not self.is_main:
            return
        save_checkpoint(slim_checkpoint(self.checkpoint()), self.out_dir / f"epoch-{epoch:03d}.pt")
        for old in sorted(self.out_dir.glob("epoch-[0-9][0-9][0-9].pt"))[:-keep]:
            old.unlink()

    def check_replicas(self) -> None:
        """Under DDP every rank must hold the same weights; log the check (and fail loudly if not)."""
        if self.world == 1:
            return
        checksum = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        in_sync = all(torch.equal(g, gathered[0]) for g in gathered)
        self.log(
            {
                "event": "ddp_check",
                "world": self.world,
                "replicas_in_sync": in_sync,
                "checksums": [float(g) for g in gathered],
            }
        )
        if not in_sync:
            raise RuntimeError("DDP replicas diverged: parameter checksums differ across ranks")
        dist.barrier()


def train(cfg: Config, out_dir: Path, resume: bool = True, progress: bool = True) -> dict[str, Any]:
    trainer = Trainer(cfg, out_dir)
    try:
        return trainer.run(resume=resume, progress=progress)
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
