"""The torch reference search: what it may and may not generate."""

from __future__ import annotations

import pytest
import torch

from tests.training.test_ensemble import inputs, model
from training.decode import beam_search


@torch.no_grad()
@pytest.mark.parametrize("beam", [1, 3])
def test_the_reference_search_never_generates_pad_or_bos(beam: int) -> None:
    a = model(4)
    a.out.bias[[0, 1]] = 50.0  # the model all but insists on <pad> and <s>
    src, src_len = inputs()
    for hyps in beam_search(a, src, src_len, beam=beam, n_best=beam, max_len=6):
        assert hyps and all(0 not in h.tokens and 1 not in h.tokens for h in hyps)
