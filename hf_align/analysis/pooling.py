"""Pooling a (B, T, D) hidden state into samples, aware of the attention mask.

- ``"cls"``:    h[:, 0]                                     (B, D)
- ``"mean"``:   sum_t m_t h_t / sum_t m_t                  (B, D), m = attention_mask (all ones if absent)
- ``"last"``:   h at the last position with m_t = 1         (B, D), works with left or right padding
- ``"tokens"``: every position with m_t = 1 as a sample     (N_tokens, D)
"""

from __future__ import annotations

import torch

POOLINGS = ("cls", "mean", "last", "tokens")


def _mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    B, T = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=hidden.device)
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)} to match the hidden states")
    m = attention_mask.to(hidden.device).bool()
    if not bool(m.any(dim=1).all()):
        raise ValueError("a sequence in the batch has no non-padding token (attention_mask all zero)")
    return m


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """Pool one layer's hidden state (B, T, D) -> samples (B, D) or (N_tokens, D); see the module docstring."""
    if hidden.ndim != 3:
        raise ValueError(f"expected hidden states of shape (batch, tokens, dim), got {tuple(hidden.shape)}")
    if pooling == "cls":
        return hidden[:, 0]
    m = _mask(hidden, attention_mask)
    if pooling == "mean":
        w = m.to(hidden.dtype).unsqueeze(-1)
        return (hidden * w).sum(1) / w.sum(1)
    if pooling == "last":
        T = hidden.shape[1]
        pos = torch.arange(T, device=hidden.device).expand_as(m)
        last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "tokens":
        return hidden[m]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
