"""The one attention function of the project, with TACA's temperature.

Joint attention runs over one sequence `[text tokens | image tokens]` (text first, as in both the
BFL and the SAI layouts), so the modality of a token is given by `n_txt` alone.

TACA (arXiv 2506.07986) multiplies the logits of image queries x text keys by gamma. We take the
general form: a temperature matrix `T[query modality][key modality]` (0 = text, 1 = image), and

    logits[i, j] = T[m(i), m(j)] * <q_i, k_j> / sqrt(d)

Scaling key j by c scales its logit by c for every query, so for the queries of one modality the
temperature is a rescaling of the keys. Two fused SDPA calls, one per query modality, each with its
keys rescaled by its row of T, compute the exact result; no `[L, L]` tensor is ever built.

Observers (the attention probe, mmdit/probe.py) can watch every call: each function in `OBSERVERS`
is called as `f(q, k, n_txt, temperature)` before the attention is computed. The list is empty
unless a probe runs, and then the cost is one check of an empty list (no graph break under
`torch.compile`).

`temperature` may be:
- `None`: plain SDPA (one call);
- a float gamma: the paper's TACA, `T = [[1, 1], [gamma, 1]]` (text queries take the plain call);
- a tensor `[2, 2]`, `[H, 2, 2]` (per head) or `[B, H, 2, 2]` (per sample and head; H may be 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Temperature = float | Tensor | None
Observer = Callable[[Tensor, Tensor, int, Temperature], None]  # f(q, k, n_txt, temperature)
OBSERVERS: list[Observer] = []


def taca_matrix(gamma: float) -> Tensor:
    """The paper's temperature as a 2x2 matrix: image queries x text keys scaled by gamma."""
    return torch.tensor([[1.0, 1.0], [gamma, 1.0]])


def as_temperature_matrix(temperature: Temperature) -> Tensor | None:
    """Normalize a temperature to a `[B|1, H|1, 2, 2]` tensor (or None)."""
    if temperature is None:
        return None
    if not isinstance(temperature, Tensor):
        return taca_matrix(float(temperature))[None, None]
    if temperature.shape[-2:] != (2, 2) or temperature.dim() not in (2, 3, 4):
        raise ValueError(
            "temperature tensor must have shape [2, 2], [H, 2, 2] or [B, H, 2, 2] "
            f"(indexed [query modality][key modality], 0 = text, 1 = image), got {list(temperature.shape)}"
        )
    while temperature.dim() < 4:
        temperature = temperature[None]
    return temperature


def temperature_on(temperature: Temperature, device) -> Temperature:
    """A tensor temperature moved to the device, once per model forward rather than once per attention."""
    return as_temperature_matrix(temperature).to(device) if isinstance(temperature, Tensor) else temperature


def _check(q: Tensor, n_txt: int) -> None:
    if q.dim() != 4:
        raise ValueError(f"attention expects q, k, v as [B, H, L, D], got q of shape {list(q.shape)}")
    if not 0 <= n_txt <= q.shape[2]:
        raise ValueError(f"n_txt={n_txt} is outside the sequence length {q.shape[2]}")


def scaled_keys(k: Tensor, n_txt: int, row: Tensor) -> Tensor:
    """Keys of one query modality's call: text keys times row[..., 0], image keys times row[..., 1]."""
    row = row.to(k.dtype)[..., None, None]  # (B|1, H|1, 2, 1, 1)
    return torch.cat((k[:, :, :n_txt] * row[:, :, 0], k[:, :, n_txt:] * row[:, :, 1]), dim=2)


def _joined(out_txt: Tensor, out_img: Tensor) -> Tensor:
    """(B, H, L_txt, D) and (B, H, L_img, D) -> (B, L, H*D) in one copy (SDPA returns (B, L, H, D) memory)."""
    return torch.cat((out_txt.transpose(1, 2), out_img.transpose(1, 2)), dim=1).flatten(2)


def attention(q: Tensor, k: Tensor, v: Tensor, n_txt: int, temperature: Temperature = None) -> Tensor:
    """Joint attention. q, k, v: (B, H, L, D), text first; returns (B, L, H*D)."""
    _check(q, n_txt)
    for observe in OBSERVERS:
        observe(q, k, n_txt, temperature)
    if temperature is None or n_txt in (0, q.shape[2]):
        # One modality only: T[m][m] applies (the paper's gamma leaves it at 1).
        if isinstance(temperature, Tensor):
            m = int(n_txt == 0)
            k = k * as_temperature_matrix(temperature)[:, :, m, m].to(k)[..., None, None]
        out = F.scaled_dot_product_attention(q, k, v)
    elif not isinstance(temperature, Tensor):
        # The paper's TACA: text queries see plain keys; image queries see text keys times gamma.
        out_txt = F.scaled_dot_product_attention(q[:, :, :n_txt], k, v)
        k_img = torch.cat((k[:, :, :n_txt] * float(temperature), k[:, :, n_txt:]), dim=2)
        out_img = F.scaled_dot_product_attention(q[:, :, n_txt:], k_img, v)
        return _joined(out_txt, out_img)
    else:
        T = as_temperature_matrix(temperature).to(q.device)
        out_txt = F.scaled_dot_product_attention(q[:, :, :n_txt], scaled_keys(k, n_txt, T[:, :, 0]), v)
        out_img = F.scaled_dot_product_attention(q[:, :, n_txt:], scaled_keys(k, n_txt, T[:, :, 1]), v)
        return _joined(out_txt, out_img)
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


def temperature_logit_scale(temperature: Temperature, n_txt: int, L: int, device=None) -> Tensor:
    """The full `[B|1, H|1, L, L]` factor that multiplies the logits (for the reference only)."""
    m = (torch.arange(L, device=device) >= n_txt).long()  # modality of each token
    if temperature is None:
        return torch.ones(1, 1, L, L, device=device)
    T = as_temperature_matrix(temperature).to(device)
    return T[:, :, m[:, None], m[None, :]]


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor, n_txt: int, temperature: Temperature = None
) -> Tensor:
    """Explicit logits, for teaching and tests: softmax(T * q k^T / sqrt(d)) v. Same contract as `attention`."""
    _check(q, n_txt)
    B, H, L, D = q.shape
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, L, L)
    logits = logits * temperature_logit_scale(temperature, n_txt, L, q.device).to(logits.dtype)
    out = logits.softmax(dim=-1) @ v  # (B, H, L, D)
    return out.transpose(1, 2).reshape(B, L, H * D)
