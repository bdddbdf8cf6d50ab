"""What every drafter shares: sampling, tree buffers, target verification, acceptance, KV compaction.

Sampling lives here (not in generate.py) because lossless rejection sampling must turn logits into the
*same* distribution p that plain decoding samples from: one function, used by both paths.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None) -> Tensor:
    """The target distribution p at temperature > 0 with optional top-k and top-p (nucleus) truncation.
    Works on [..., V] and keeps static shapes (masking, not slicing), so it compiles once."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the top token is always kept)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample_from(probs: Tensor) -> Tensor:
    """One draw per row of probs [..., V] → [...] without a host sync (Gumbel-style exponential trick)."""
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> Tensor:
    """Next token from logits [..., V]: argmax when temperature == 0, else a draw from logits_to_probs."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    return sample_from(logits_to_probs(logits, temperature, top_k, top_p))
