"""Offline decoding of many sources through a bundle's serving beam search (export checks and evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from service.engine.batch import Job, decode_all
from service.runtime.bundle import Bundle

CHUNK = 512  # jobs handed to decode_all at once (its step-level batch refills as they finish)


def decode_in_order(bundle: Bundle, jobs: Sequence[Job], progress: bool = False, desc: str = "decode") -> list[Job]:
    """``jobs`` (tagged 0..n-1) decoded to the end with ``decode_all``, returned in tag order (decode_all returns
    them as they finish)."""
    done: dict[int, Job] = {}
    for start in tqdm(range(0, len(jobs), CHUNK), desc=desc, unit="chunk", disable=not progress):
        chunk = jobs[start : start + CHUNK]
        done.update({j.tag: j for j in decode_all(bundle.runtime, chunk, copy=bundle.copy, pad_id=bundle.pad)})
    return [done[i] for i in range(len(jobs))]
