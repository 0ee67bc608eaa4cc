"""A string-reversal model whose outputs vary 30-fold in length, for the "where step batching pays" benchmark.

    python -m bench.reverse_model --out runs/bench-reverse      # data, training, export: a few minutes on 2 cores

Writes ``<out>/data/{train,dev}.tsv`` (random lowercase strings of 2-60 characters -> the characters reversed,
space-separated; seeded), trains a small attention LSTM on them with ``training/`` and exports it to
``<out>/models/reverse/1`` with the usual parity checks. The G2P targets are measured on the shipped model; this
model only exists to show how the two batching modes compare when output lengths differ widely.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.data import Example, reverse_task

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MIN_LEN, MAX_LEN = 2, 60


def examples(count: int, seed: int) -> list[Example]:
    """training's reversal task with lengths uniform in [MIN_LEN, MAX_LEN] over the whole alphabet (seeded)."""
    return reverse_task(count, seed, ALPHABET, MIN_LEN, MAX_LEN)


def random_sources(count: int, seed: int) -> list[str]:
    """The sources of :func:`examples`."""
    return [e.src for e in examples(count, seed)]


def write_tsv(path: Path, rows: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{e.src}\t{e.refs[0]}\n" for e in rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-reverse"))
    p.add_argument("--train-size", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    from export.pipeline import ExportOptions, export_checkpoint
    from training.config import load_config
    from training.train import train

    data = args.out / "data"
    write_tsv(data / "train.tsv", examples(args.train_size, args.seed))
    write_tsv(data / "dev.tsv", examples(500, args.seed + 1))
    overrides = [
        "data.dataset=tsv",
        f"data.train={data / 'train.tsv'}",
        f"data.dev={data / 'dev.tsv'}",
        "data.src_tokenizer=char",
        "data.tgt_tokenizer=word",
        f"data.max_tgt_len={MAX_LEN + 5}",
        "model.cell=lstm",
        "model.emb_size=32",
        "model.enc_hidden=64",
        "model.enc_layers=1",
        "model.dec_hidden=128",
        "model.dec_layers=1",
        "model.attention=general",
        "model.dropout=0.0",
        "model.emb_dropout=0.0",
        f"train.epochs={args.epochs}",
        "train.batch_size=64",
        "train.lr=0.003",
        f"train.seed={args.seed}",
    ]
    start = time.monotonic()
    summary = train(load_config(None, overrides), args.out / "run", resume=True, progress=True)
    trained = time.monotonic() - start
    target = args.out / "models" / "reverse" / "1"
    export_checkpoint(
        args.out / "run" / "best.pt", target, ExportOptions(name="reverse", version=1, parity_limit=200, overwrite=True)
    )
    print(json.dumps({"train_seconds": round(trained, 1), "summary": summary, "bundle": str(target)}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
