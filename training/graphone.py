"""``seqserve graphone``: a joint-sequence (graphone) n-gram model of a checkpoint's training split.

The recipe is Phonetisaurus's (Novak et al. 2016): a many-to-many EM alignment of every training pair
(``phonetisaurus-align``: chunks of 1-2 source tokens to 0-2 target tokens) and a modified Kneser-Ney n-gram over
the aligned graphone sequences (MITLM's ``estimate-ngram``). Both programs come with the ``phonetisaurus``
package of the ``train`` extra (x86-64 Linux binaries, BSD / MIT licensed); the result is converted to the
compact numpy file the server reads (:class:`service.runtime.graphone.GraphoneModel`). ``seqserve export
--graphone FILE`` puts it into a bundle and tunes its weight on the dev split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from service.runtime.graphone import (
    MAX_SOURCE_CHUNK,
    MAX_TARGET_CHUNK,
    RESERVED,
    GraphoneError,
    GraphoneModel,
    normalise,
    target_pattern,
)
from service.text import Tokenizer
from training.data import Example

ALIGN_ITERATIONS = 11  # EM iterations of the alignment (phonetisaurus-align's default)


def tools() -> tuple[Path, dict[str, str]]:
    """The directory of the phonetisaurus / MITLM programs and the environment they run in."""
    spec = importlib.util.find_spec("phonetisaurus")
    if spec is None or spec.origin is None:
        raise GraphoneError("the phonetisaurus package is not installed: pip install 'seqserve[train]'")
    root = Path(spec.origin).parent
    machine = platform.machine()
    bin_dir, lib_dir = root / "bin" / machine, root / "lib" / machine
    if not (bin_dir / "phonetisaurus-align").is_file():
        raise GraphoneError(f"the phonetisaurus package has no programs for this machine ({machine})")
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = f"{lib_dir}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    return bin_dir, env


def lexicon(
    examples: Sequence[Example], src_tok: Tokenizer, tgt_tok: Tokenizer, strip: str = ""
) -> tuple[list[str], int]:
    """``s o u r c e<TAB>T A R G E T`` lines (tokens space-separated; ``strip`` removed from target tokens), one
    per distinct reference; and how many pairs were left out: tokens with whitespace or a reserved graphone symbol,
    or more target than 2 x source tokens (no alignment exists)."""
    pattern = target_pattern(strip)
    lines: list[str] = []
    skipped = 0
    for ex in examples:
        src = src_tok.tokenize(ex.src)
        targets = dict.fromkeys(tuple(normalise(tgt_tok.tokenize(ref), pattern)) for ref in ex.refs)
        for tgt in targets:
            tokens = [*src, *tgt]
            unusable = any(not t or any(c.isspace() for c in t) or any(r in t for r in RESERVED) for t in tokens)
            if unusable or not src or not tgt or len(tgt) > MAX_TARGET_CHUNK * len(src):
                skipped += 1
                continue
            lines.append(f"{' '.join(src)}\t{' '.join(tgt)}")
    return lines, skipped


def _run(command: list[str], env: dict[str, str], what: str, cwd: Path, iterations: int = 0) -> None:
    """Run one of the programs; its last output line names the failure. With ``iterations``, a progress bar
    follows the EM iterations the aligner reports (``Iteration: N ...`` lines)."""
    last: deque[str] = deque(maxlen=1)
    try:
        with (
            subprocess.Popen(
                command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            ) as proc,
            tqdm(total=iterations, desc="graphone: align (EM)", unit="iteration", disable=not iterations) as bar,
        ):
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip():
                    last.append(line.strip())
                if line.startswith("Iteration:") and bar.n < iterations:
                    bar.update(1)
            code = proc.wait()
    except OSError as exc:
        raise GraphoneError(f"cannot run {command[0]}: {exc.strerror}") from None
    if code != 0:
        raise GraphoneError(f"{what} failed (exit status {code}): {last[0] if last else 'no output'}")


def train_graphones(
    lines: Sequence[str], out: Path, order: int, strip: str = "", progress: bool = False
) -> GraphoneModel:
    """Align the lexicon lines, estimate the n-gram, write ``out`` (npz)."""
    if not lines:
        raise GraphoneError("no training pairs to align")
    if order < 2:
        raise GraphoneError(f"the n-gram order must be >= 2, got {order}")
    bin_dir, env = tools()
    with tempfile.TemporaryDirectory(prefix="graphone-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "train.lex").write_text("\n".join(lines) + "\n", encoding="utf-8")
        _run(
            [
                str(bin_dir / "phonetisaurus-align"),
                "--input=train.lex",
                "--ofile=train.corpus",
                "--s1_char_delim= ",
                "--seq1_del=false",
                "--seq2_del=true",
                f"--seq1_max={MAX_SOURCE_CHUNK}",
                f"--seq2_max={MAX_TARGET_CHUNK}",
                "--grow=false",
                f"--iter={ALIGN_ITERATIONS}",
            ],
            env,
            "the alignment (phonetisaurus-align)",
            tmp,
            ALIGN_ITERATIONS if progress else 0,
        )
        if not (tmp / "train.corpus").stat().st_size:
            raise GraphoneError("the alignment produced no aligned pairs")
        _run(
            [str(bin_dir / "estimate-ngram"), "-o", str(order), "-t", "train.corpus", "-wl", "train.arpa"],
            env,
            "the n-gram estimation (estimate-ngram)",
            tmp,
        )
        model = GraphoneModel.from_arpa(tmp / "train.arpa", strip)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    model.save(partial)
    partial.replace(out)
    return model


def build_from_checkpoint(
    checkpoint: Path, out: Path, order: int, strip: str = "", progress: bool = False
) -> dict[str, Any]:
    """The graphone model of a checkpoint's training split, in its tokenization."""
    from training.config import config_from_dict
    from training.train import load_checkpoint, load_datasets, tokenizers_from_checkpoint

    start = time.monotonic()
    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    src_tok, tgt_tok = tokenizers_from_checkpoint(ckpt)
    train = load_datasets(cfg.data, cfg.train.seed).train
    lines, skipped = lexicon(train, src_tok, tgt_tok, strip)
    model = train_graphones(lines, out, order, strip, progress)
    return {
        "pairs": len(lines),
        "skipped": skipped,
        "order": model.order,
        "graphones": len(model.tokens),
        "ngrams": model.size,
        "bytes": out.stat().st_size,
        "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "seconds": time.monotonic() - start,
    }
