"""Schedules, the sampler's step (Euler, CFG, distilled guidance, TACA, the LoRA gate), against Diffusers'
FlowMatchEulerDiscreteScheduler and the formulas written out."""

import math

import numpy as np
import pytest
import torch
from builders import rel_err
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from mmdit.lora import adapters, inject_lora
from sampling.sampler import Conditioning, Guidance, SkipLayerGuidance, denoise
from sampling.schedules import flux_mu, flux_sigmas, given_sigmas, sd3_sigmas, shift_sigmas
from sampling.taca import TacaSchedule, is_plain, temperature_at

# the scheduler configs shipped in the official repos' scheduler/ folders
FLUX_DEV_SCHED = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHED = dict(shift=1.0, use_dynamic_shifting=False)
SD3_SCHED = dict(shift=3.0)


def diffusers_flux(steps, seq_len, config):
    s = FlowMatchEulerDiscreteScheduler(**config)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    return s.sigmas


@pytest.mark.parametrize("steps,size", [(28, 1024), (30, 1024), (50, 512), (4, 768), (20, 1360)])
def test_flux_dev_sigmas_match_diffusers(steps, size):
    seq_len = (size // 16) ** 2
    ours = flux_sigmas(steps, seq_len)
    assert ours.shape == (steps + 1,) and ours[-1] == 0
    assert (ours - diffusers_flux(steps, seq_len, FLUX_DEV_SCHED)).abs().max() < 1e-6


def test_flux_schnell_sigmas_unshifted():
    ours = flux_sigmas(4, 4096, shifted=False)
    assert (ours - diffusers_flux(4, 4096, FLUX_SCHNELL_SCHED)).abs().max() < 1e-7
    assert torch.allclose(ours, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("steps", [1, 4, 28, 40])
def test_sd3_sigmas_match_diffusers(steps):
    s = FlowMatchEulerDiscreteScheduler(**SD3_SCHED)
    s.set_timesteps(steps)
    assert (sd3_sigmas(steps) - s.sigmas).abs().max() < 1e-6


def test_one_shift_formula_serves_both():
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    mu = flux_mu(1024)
    bfl = math.exp(mu) / (math.exp(mu) + (1 / t - 1))  # FLUX's form
    assert (shift_sigmas(t, math.exp(mu)) - bfl).abs().max() < 1e-12
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


def test_given_sigmas():
    assert given_sigmas([1.0, 0.5, 0.2]).tolist() == pytest.approx([1.0, 0.5, 0.2, 0.0])
    assert given_sigmas([0.9, 0.3, 0.0]).tolist() == pytest.approx([0.9, 0.3, 0.0])
    with pytest.raises(ValueError, match="decrease"):
        given_sigmas([0.5, 0.9])
    with pytest.raises(ValueError, match="steps"):
        flux_sigmas(0, 256)


class Field(torch.nn.Module):
    """A stand-in transformer whose velocity depends on x and t: `x A + t`."""

    def __init__(self, A):
        super().__init__()
        self.A = A

    def forward(self, x, t, context, pooled, guidance=None, temperature=None):
        return x @ self.A + t[:, None]


def test_denoise_matches_scheduler_step():
    """Our loop and Diffusers' scheduler.step agree on a velocity field that depends on x and t."""
    g = torch.Generator().manual_seed(0)
    A, x0 = torch.randn(8, 8, generator=g) / 4, torch.randn(2, 8, generator=g)
    field = Field(A)

    sched = FlowMatchEulerDiscreteScheduler(**SD3_SCHED)
    sched.set_timesteps(7)
    ref = x0.clone()
    for ts in sched.timesteps:
        ref = sched.step(field(ref, (ts / 1000).expand(2), None, None), ts, ref, return_dict=False)[0]
    cond = Conditioning(torch.zeros(2, 1, 1), torch.zeros(2, 1))
    ours = denoise(field, x0.clone(), sd3_sigmas(7), cond)
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(ours, x0) > 1e-2  # the field did move x


class Recorder(torch.nn.Module):
    """A stand-in transformer: records its inputs, returns a velocity that depends on the context."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, pooled, guidance=None, temperature=None):
        self.calls.append(dict(B=x.shape[0], t=t.clone(), guidance=guidance, temperature=temperature))
        return x * context.mean((1, 2))[:, None, None, None] + pooled.sum(1)[:, None, None, None]


def test_cfg_one_batch_formula():
    """One step from t = 0.5 to 0: x - 0.5 (v_neg + cfg (v_pos - v_neg)), both branches in one batch."""
    g = torch.Generator().manual_seed(1)
    pos = Conditioning(torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, generator=g))
    neg = Conditioning(torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, generator=g))
    x, sigmas = torch.randn(2, 4, 2, 2, generator=g), torch.tensor([0.5, 0.0])
    model = Recorder()
    ours = denoise(model, x, sigmas, pos, Guidance(negative=neg, cfg=4.5))
    assert [c["B"] for c in model.calls] == [4]  # both branches in one batch
    v_pos, v_neg = (model(x, torch.full((2,), 0.5), *c) for c in ((pos.context, pos.pooled), (neg.context, neg.pooled)))
    assert rel_err(ours, x - 0.5 * (v_neg + 4.5 * (v_pos - v_neg))) < 1e-6
    plain = denoise(model, x, sigmas, pos)
    assert rel_err(plain, x - 0.5 * v_pos) < 1e-6 and rel_err(plain, ours) > 1e-2


def test_distilled_guidance_passed_per_sample():
    model = Recorder()
    cond = Conditioning(torch.ones(3, 2, 4), torch.ones(3, 5))
    denoise(model, torch.zeros(3, 4, 2, 2), torch.tensor([1.0, 0.0]), cond, Guidance(distilled=3.5))
    assert model.calls[0]["guidance"].tolist() == [3.5, 3.5, 3.5]
    denoise(model, torch.zeros(3, 4, 2, 2), torch.tensor([1.0, 0.0]), cond, Guidance(distilled=3.5, negative=cond, cfg=2))
    assert model.calls[1]["guidance"].tolist() == [3.5] * 6  # the CFG batch: 2B


def test_slg_needs_cfg():
    with pytest.raises(ValueError, match="on top of classifier-free guidance"):
        Guidance(slg=SkipLayerGuidance((0,)))


def test_taca_schedule_first_three_steps_of_flux_dev_30():
    """The paper's gamma0 = 1.2 while 1000 t >= 970: the first three of 30 FLUX-dev steps at 1024x1024."""
    sigmas = flux_sigmas(30, (1024 // 16) ** 2)
    schedule = TacaSchedule()
    temps = [temperature_at(schedule, t) for t in sigmas[:-1]]
    assert temps[:3] == [1.2, 1.2, 1.2] and all(t is None for t in temps[3:])


def test_temperature_forms_and_plain_values():
    m = torch.tensor([[1.0, 1.0], [1.3, 1.0]])
    assert temperature_at(1.0, 0.5) is None and temperature_at(None, 0.5) is None
    assert temperature_at(torch.ones(2, 2), 0.5) is None
    assert temperature_at(1.2, 0.1) == 1.2 and temperature_at(m, 0.1) is m
    assert temperature_at(lambda t: m if t > 0.5 else 1.0, 0.9) is m
    assert temperature_at(lambda t: m if t > 0.5 else 1.0, 0.2) is None
    assert is_plain(1) and not is_plain(m)


def test_sampler_passes_scheduled_temperature():
    model = Recorder()
    cond = Conditioning(torch.ones(1, 2, 4), torch.ones(1, 5))
    sigmas = flux_sigmas(30, 4096)
    denoise(model, torch.zeros(1, 4, 2, 2), sigmas, cond, temperature=TacaSchedule(1.25))
    assert [c["temperature"] for c in model.calls] == [1.25] * 3 + [None] * 27
    assert torch.equal(torch.stack([c["t"][0] for c in model.calls]), sigmas[:-1])


def test_per_sample_temperature_is_repeated_for_the_cfg_batch():
    model = Recorder()
    cond = Conditioning(torch.ones(2, 2, 4), torch.ones(2, 5))
    per_sample = torch.ones(2, 3, 2, 2)
    per_sample[:, :, 1, 0] = torch.tensor([1.2, 1.4])[:, None]  # image queries x text keys, per sample
    denoise(model, torch.zeros(2, 4, 2, 2), torch.tensor([1.0, 0.0]), cond, Guidance(negative=cond, cfg=2),
            temperature=per_sample)
    assert torch.equal(model.calls[0]["temperature"], torch.cat((per_sample, per_sample)))  # [negative | positive]


class LoRAProbe(torch.nn.Module):
    """A stand-in transformer with one LoRA-able Linear; records whether its adapter is on at each call."""

    family = "flux"

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.on = []

    def forward(self, x, t, context, pooled, guidance=None, temperature=None):
        self.on.append(all(a.enabled for _, _, a in adapters(self)))
        return torch.zeros_like(x)


@pytest.mark.parametrize("gate", [True, False])
def test_lora_gate_follows_the_taca_schedule(gate):
    model = LoRAProbe()
    inject_lora(model, "taca", rank=2, targets=["proj"])
    cond = Conditioning(torch.ones(1, 2, 4), torch.ones(1, 5))
    denoise(model, torch.zeros(1, 4, 2, 2), flux_sigmas(30, 4096), cond, temperature=TacaSchedule(), gate_lora=gate)
    assert model.on == ([True] * 3 + [False] * 27 if gate else [True] * 30)
    assert all(a.enabled for _, _, a in adapters(model))  # the user's state is back after each step
    model.on.clear()
    denoise(model, torch.zeros(1, 4, 2, 2), flux_sigmas(4, 4096), cond)  # no TACA: the LoRA simply on
    assert model.on == [True] * 4
