"""The one attention function of the project, with TACA's temperature.

Joint attention runs over one sequence `[text tokens | image tokens]` (text first, as in both the
BFL and the SAI layouts), so the modality of a token is given by `n_txt` alone.

TACA (arXiv 2506.07986) multiplies the logits of image queries x text keys by gamma. We take the
general form: a temperature matrix `T[query modality][key modality]` (0 = text, 1 = image), and

    logits[i, j] = T[m(i), m(j)] * <q_i, k_j> / sqrt(d)

Scaling key j by c scales its logit by c for every query, so for the queries of one modality the
temperature is a rescaling of the keys. Two fused SDPA calls, one per query modality, each with its
keys rescaled by its row of T, compute the exact result; no `[L, L]` tensor is ever built.

`temperature` may be:
- `None`: plain SDPA (one call);
- a float gamma: the paper's TACA, the matrix `T = [[1, 1], [gamma, 1]]`;
- a tensor `[2, 2]`, `[H, 2, 2]` (per head) or `[B, H, 2, 2]` (per sample and head; H may be 1).
Deviation: T is applied to the keys in their dtype (in bf16, gamma = 1.2 acts as 1.203).

`JointAttention` is the same function as a module without weights, one per block: the place where
the attention probe (mmdit/probe.py) hooks in from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Temperature = float | Tensor | None


def as_temperature_matrix(temperature: Temperature, device: torch.device | None = None) -> Tensor | None:
    """A temperature as a `[B|1, H|1, 2, 2]` tensor indexed [query modality][key modality] (or None).

    A float gamma becomes `[[1, 1], [gamma, 1]]`, filled on `device` (no host-to-device copy); a
    tensor of another shape is a ValueError.
    """
    if temperature is None:
        return None
    if not isinstance(temperature, Tensor):
        T = torch.ones(1, 1, 2, 2, device=device)
        T[..., 1, 0] = float(temperature)  # image queries x text keys
        return T
    if temperature.shape[-2:] != (2, 2) or temperature.dim() not in (2, 3, 4):
        raise ValueError(
            "temperature tensor must have shape [2, 2], [H, 2, 2] or [B, H, 2, 2] "
            f"(indexed [query modality][key modality], 0 = text, 1 = image), got {list(temperature.shape)}"
        )
    T = temperature[(None,) * (4 - temperature.dim())]
    return T if device is None else T.to(device)


def key_scales(T: Tensor, n_txt: int, L: int) -> Tensor:
    """T (B|1, H|1, 2, 2) spread over the keys: (B|1, H|1, 2, L), for each query modality (row of T) the
    factor of each key, T[m, 0] on the n_txt text keys and T[m, 1] on the image keys."""
    rows = T.shape[:-1]
    return torch.cat((T[..., :1].expand(*rows, n_txt), T[..., 1:].expand(*rows, L - n_txt)), dim=-1)


def _check(q: Tensor, n_txt: int) -> None:
    if q.dim() != 4:
        raise ValueError(f"attention expects q, k, v as [B, H, L, D], got q of shape {list(q.shape)}")
    if not 0 <= n_txt <= q.shape[2]:
        raise ValueError(f"n_txt={n_txt} is outside the sequence length {q.shape[2]}")


def attention(q: Tensor, k: Tensor, v: Tensor, n_txt: int, temperature: Temperature = None) -> Tensor:
    """Joint attention softmax(T * q k^T / sqrt(d)) v. q, k, v: (B, H, L, D), text first; returns (B, L, H*D)."""
    _check(q, n_txt)
    T = as_temperature_matrix(temperature, q.device)
    if T is None:
        return rearrange(F.scaled_dot_product_attention(q, k, v), "B H L D -> B L (H D)")
    L = q.shape[2]
    scales = key_scales(T.to(k.dtype), n_txt, L)[..., None]  # (B|1, H|1, 2, L, 1)
    out = []
    for m, queries in enumerate((slice(0, n_txt), slice(n_txt, L))):  # m: the query modality
        if queries.start < queries.stop:
            o = F.scaled_dot_product_attention(q[:, :, queries], k * scales[:, :, m], v)  # (B, H, L_m, D)
            out.append(rearrange(o, "B H L D -> B L H D"))  # a view: SDPA returns (B, L, H, D) memory
    return torch.cat(out, dim=1).flatten(2)  # (B, L, H*D), one copy


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, n_txt: int, temperature: Temperature = None
) -> Tensor:
    """Explicit logits, for teaching and tests: softmax(T * q k^T / sqrt(d)) v. Same contract as `attention`."""
    _check(q, n_txt)
    L, D = q.shape[2], q.shape[3]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, L, L)
    T = as_temperature_matrix(temperature, q.device)
    if T is not None:
        m = (torch.arange(L, device=q.device) >= n_txt).long()  # modality of each token
        logits = logits * T[:, :, m[:, None], m[None, :]].to(logits.dtype)  # (B|1, H|1, L, L)
    return rearrange(logits.softmax(dim=-1) @ v, "B H L D -> B L (H D)")


class JointAttention(nn.Module):
    """`attention` as a module without weights (no state-dict keys): one per block, for hooks from outside."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, n_txt: int, temperature: Temperature = None) -> Tensor:
        return attention(q, k, v, n_txt, temperature)
