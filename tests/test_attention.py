"""The fused TACA attention equals explicit logits, for every form of the temperature."""

import math

import pytest
import torch
from builders import rel_err

from mmdit.attention import as_temperature_matrix, attention, attention_reference

B, H, L, D = 2, 3, 11, 16
TACA_1_3 = torch.tensor([[1.0, 1.0], [1.3, 1.0]])  # the paper's form as a matrix [query][key]


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g) * 2 for _ in range(3)]


def explicit(q, k, v, factor):
    """softmax(factor * q k^T / sqrt(d)) v, written out independently of the module."""
    w = torch.softmax(factor * (q @ k.transpose(-1, -2)) / math.sqrt(D), dim=-1)
    return (w @ v).transpose(1, 2).reshape(q.shape[0], L, -1)


@pytest.mark.parametrize("n_txt", [0, 1, 4, L - 1, L])
@pytest.mark.parametrize(
    "temperature",
    [None, 1.0, 1.2, 0.7, TACA_1_3, torch.tensor([[0.9, 1.1], [1.25, 0.8]])],
    ids=["none", "g1", "g1.2", "g0.7", "matrix1.3", "matrix-general"],
)
def test_fast_equals_reference(qkv, n_txt, temperature):
    fast = attention(*qkv, n_txt, temperature)
    ref = attention_reference(*qkv, n_txt, temperature)
    assert rel_err(fast, ref) <= 1e-5


def test_paper_taca_scales_only_image_queries_x_text_keys(qkv):
    n_txt, gamma = 4, 1.2
    factor = torch.ones(L, L)
    factor[n_txt:, :n_txt] = gamma  # rows: queries, columns: keys
    expected = explicit(*qkv, factor)
    assert rel_err(attention(*qkv, n_txt, gamma), expected) <= 1e-5
    assert torch.equal(as_temperature_matrix(gamma), torch.tensor([[[[1.0, 1.0], [gamma, 1.0]]]]))
    assert rel_err(attention(*qkv, n_txt, torch.tensor([[1.0, 1.0], [gamma, 1.0]])), expected) <= 1e-5
    # and it really changes the result (so the check above can fail)
    assert rel_err(attention(*qkv, n_txt, None), expected) > 1e-3


def test_per_head_and_per_sample_temperature(qkv):
    n_txt = 5
    per_head = torch.rand(H, 2, 2) + 0.5
    per_sample = torch.rand(B, H, 2, 2) + 0.5
    for T in (per_head, per_sample, per_head[:1]):
        fast = attention(*qkv, n_txt, T)
        for b in range(B):
            for h in range(H):
                Tb = T.expand(B, H, 2, 2)[b, h] if T.dim() == 4 else T.expand(H, 2, 2)[h]
                m = (torch.arange(L) >= n_txt).long()
                factor = Tb[m[:, None], m[None, :]]
                q, k, v = (t[b : b + 1, h : h + 1] for t in qkv)
                w = torch.softmax(factor * (q @ k.transpose(-1, -2)) / math.sqrt(D), -1)
                assert rel_err(fast[b, :, h * D : (h + 1) * D], (w @ v)[0, 0]) <= 1e-5


def test_gamma_one_is_plain_attention(qkv):
    assert rel_err(attention(*qkv, 4, 1.0), attention(*qkv, 4, None)) <= 1e-6
    assert rel_err(attention(*qkv, 4, torch.ones(2, 2)), attention(*qkv, 4, None)) <= 1e-6


def test_gradients_match_reference(qkv):
    T = torch.tensor([[1.0, 0.9], [1.3, 1.1]])
    a = [t.clone().requires_grad_() for t in qkv]
    b = [t.clone().requires_grad_() for t in qkv]
    w = torch.randn(B, L, H * D)
    (attention(*a, 6, T) * w).sum().backward()
    (attention_reference(*b, 6, T) * w).sum().backward()
    for x, y in zip(a, b):
        assert rel_err(x.grad, y.grad) <= 1e-5


def test_bad_input_is_named(qkv):
    with pytest.raises(ValueError, match=r"\[2, 2\], \[H, 2, 2\]"):
        attention(*qkv, 3, torch.ones(3))
    with pytest.raises(ValueError, match="n_txt=20"):
        attention(*qkv, 20, 1.2)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        attention(qkv[0][0], qkv[1][0], qkv[2][0], 3)
