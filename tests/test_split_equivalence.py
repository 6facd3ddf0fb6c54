"""The project's first test: with compression off, the split model equals the unsplit model."""

from __future__ import annotations

import pytest
import torch

from splitcli.errors import SplitLLMError
from splitcli.model.split import decoder_parts
from splitcli.runtime.session import SplitSession, UnsplitSession

STEPS = 64


def _greedy_pair(model, split_layer, ids, mask=None, steps=STEPS, chunk=None):
    """Run unsplit and split side by side (greedy from the unsplit logits); return max |Δlogit| and tokens."""
    u, s = UnsplitSession(model), SplitSession(model, split_layer)
    lu = u.prefill(ids, mask, chunk_size=chunk, logits_to_keep=0)
    ls = s.prefill(ids, mask, chunk_size=chunk, logits_to_keep=0)
    worst = (lu - ls).abs().max().item()
    toks_u, toks_s = [], []
    nu, ns = lu[:, -1].argmax(-1), ls[:, -1].argmax(-1)
    for _ in range(steps):
        toks_u.append(nu)
        toks_s.append(ns)
        a, b = u.forward(nu[:, None])[:, -1], s.forward(ns[:, None])[:, -1]
        worst = max(worst, (a - b).abs().max().item())
        nu, ns = a.argmax(-1), b.argmax(-1)
    return worst, torch.stack(toks_u, 1), torch.stack(toks_s, 1)


def test_every_split_layer_matches_unsplit(tiny_model):
    n = decoder_parts(tiny_model).num_layers
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    for layer in range(1, n):
        worst, tu, ts = _greedy_pair(tiny_model, layer, ids)
        assert torch.equal(tu, ts), f"greedy tokens differ at split layer {layer}"
        assert worst <= 1e-4, f"max |Δlogit| {worst} at split layer {layer}"


def test_left_padded_batch_matches_unsplit(tiny_model):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # row 1 is 6 tokens, left-padded
    mask[2, :9] = 0  # row 2 is a single token
    worst, tu, ts = _greedy_pair(tiny_model, 2, ids, mask, steps=16)
    assert torch.equal(tu, ts)
    assert worst <= 1e-4


def test_chunked_prefill_after_prefix_matches_one_shot(tiny_model):
    """Chunked prefill (split) equals a one-shot prefill (unsplit), including after a prefix."""
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(3))
    u = UnsplitSession(tiny_model)
    ref = u.prefill(ids, logits_to_keep=0)
    s = SplitSession(tiny_model, 2)
    s.prefill(ids[:, :5], logits_to_keep=0)  # a prefix, then the rest in chunks of 7
    rest = s.prefill(ids[:, 5:], chunk_size=7, logits_to_keep=0)
    assert (ref[:, -rest.shape[1] :] - rest).abs().max().item() <= 1e-4


def test_split_layer_out_of_range_lists_valid_range(tiny_model):
    n = decoder_parts(tiny_model).num_layers
    for bad in (0, n, -1, n + 5):
        with pytest.raises(SplitLLMError, match=rf"valid range 1\.\.{n - 1}"):
            SplitSession(tiny_model, bad)


def test_real_model_split_sweep_matches_unsplit(real_lm):
    """The real default model: every ℓ at prefill, and 64 greedy steps at the ends and middle."""
    tok = real_lm.tokenizer
    ids = torch.tensor([tok("The river flows through the old town and", add_special_tokens=True)["input_ids"]])
    u = UnsplitSession(real_lm.model)
    ref = u.prefill(ids, logits_to_keep=0)
    n = decoder_parts(real_lm.model).num_layers
    for layer in range(1, n):
        got = SplitSession(real_lm.model, layer).prefill(ids, logits_to_keep=0)
        assert (ref - got).abs().max().item() <= 1e-4, f"prefill differs at ℓ={layer}"
    for layer in (1, 15, n - 1):
        worst, tu, ts = _greedy_pair(real_lm.model, layer, ids)
        assert torch.equal(tu, ts), f"greedy tokens differ at ℓ={layer}"
        assert worst <= 1e-4
