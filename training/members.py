"""Independent ensemble members trained side by side: ``python -m training.members``.

Made for a short GPU lease: the step-by-step trainer keeps a GPU busy only with several runs beside each other
(seven side by side gave about five times the throughput of one on an H200; docs/training.md). One call starts one
``seqserve train`` per seed of the same configuration, stops every run by a deadline (``train.max_minutes``, then a
hard stop a grace period later: each run keeps the best checkpoint of the epochs it finished), and writes each
member's best weights as a half-precision, weights-only checkpoint — 8.9 MB for the shipped G2P architecture,
small enough to be copied back from a lease — that ``seqserve eval / export / calibrate / average`` read like any
other (the weights are widened to float32 on load). A JSON line per member reports how far it got.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from training.average import slim_checkpoint
from training.cli import positive_int
from training.train import load_checkpoint, save_checkpoint


def half_weights(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A weights-only copy with floating-point tensors in float16 (load_state_dict widens them back)."""
    slim = slim_checkpoint(ckpt)
    slim["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    slim["state"] = dict(ckpt["state"]) | {"weights_dtype": "float16"}
    return slim


def member_command(config: Path | None, out: Path, seed: int, minutes: float, overrides: list[str]) -> list[str]:
    sets = [*overrides, f"train.seed={seed}", f"train.max_minutes={minutes}"]
    command = [sys.executable, "-m", "training.cli", "train", "--out", str(out), "--no-progress"]
    if config is not None:
        command += ["--config", str(config)]
    return command + [arg for s in sets for arg in ("--set", s)]


def summary(run: Path, seed: int, returncode: int | None) -> dict[str, Any]:
    """How far one member got, from its metrics log."""
    record: dict[str, Any] = {"seed": seed, "run": str(run), "exit": returncode}
    log = run / "metrics.jsonl"
    devs = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "dev"] if log.exists() else []
    if devs:
        record |= {"epochs": devs[-1]["epoch"], "steps": devs[-1]["step"], "wall_s": devs[-1]["wall_s"]}
        record["dev_nostress_wer"] = [round(r["dev_nostress_wer"], 4) for r in devs]
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.members", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="the members' TOML config (as seqserve train --config)")
    p.add_argument("--out", type=Path, required=True, help="a directory for the runs (OUT/seed-N)")
    p.add_argument("--seeds", type=positive_int, nargs="+", required=True, help="one member per seed")
    p.add_argument("--minutes", type=float, required=True, help="each run stops after the epoch that crosses this")
    p.add_argument("--grace", type=float, default=2.0, help="minutes after --minutes before a run is stopped hard")
    p.add_argument("--export", type=Path, help="write each member's best weights here, float16 (member-seed-N.pt)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds: each member needs its own seed")
    if not args.minutes > 0:
        p.error("--minutes must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs: dict[int, subprocess.Popen[bytes]] = {}
    for seed in args.seeds:
        run = args.out / f"seed-{seed}"
        command = member_command(args.config, run, seed, args.minutes, args.overrides)
        with (args.out / f"seed-{seed}.log").open("wb") as log:
            procs[seed] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = started + 60 * (args.minutes + args.grace)
    while any(proc.poll() is None for proc in procs.values()) and time.monotonic() < deadline:
        time.sleep(1.0)
    for proc in procs.values():
        if proc.poll() is None:  # past the grace period: the epochs it finished are in its best.pt
            proc.send_signal(signal.SIGTERM)
    failed = False
    for seed, proc in procs.items():
        returncode = proc.wait()
        run = args.out / f"seed-{seed}"
        record = summary(run, seed, returncode)
        best = run / "best.pt"
        if best.is_file() and args.export is not None:
            args.export.mkdir(parents=True, exist_ok=True)
            target = args.export / f"member-seed-{seed}.pt"
            save_checkpoint(half_weights(load_checkpoint(best)), target)
            record["exported"] = str(target)
        if not best.is_file():  # say why where only this output comes back (a lease)
            lines = (args.out / f"seed-{seed}.log").read_text(errors="replace").strip().splitlines()
            record["log_tail"] = lines[-3:]
            failed = True
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # this process only waits and converts
    sys.exit(main())
