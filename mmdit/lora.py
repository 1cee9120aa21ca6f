"""LoRA (Hu et al., 2021) on the MM-DiT Linears: `W' = W + scale * B A`, scale = strength * alpha / rank.

`LoRALinear` subclasses `nn.Linear`, so the base weight keeps its key (`...qkv.weight`) and a base
checkpoint still loads into a model with adapters; the adapters sit under `<linear>.lora.<name>`.
Each adapter may cover a row slice `[offset, offset + length)` of the output: a LoRA trained on the
separate q / k / v (or on FLUX's single-block q / k / v / mlp) applies to a slice of our fused
`qkv` / `linear1`, and several slices of one file are stacked into one adapter (A concatenated,
B block-diagonal, which is exact).

Switching adapters on and off (TACA uses its LoRA in the first steps only) writes a scalar buffer
read at forward time: no module changes, no recompilation under `torch.compile`. A disabled adapter
still runs its two small matmuls, multiplied by zero; `merge_lora` folds the enabled ones into the
weights for speed, and `unmerge_lora` subtracts them again (exact up to the weight dtype's rounding).

An adapter may also carry full-weight deltas (`WeightDelta`): `p' = p + strength * D` on any parameter,
a Linear's weight or bias, a norm's scale, a conv kernel (LoRA files call them `.diff` and `.diff_b`).
No forward can add them for every kind of module, so they live in the weights: the parameter's value
without deltas is kept (`ParamDeltas.base`, beside the module as `<module>.lora_deltas.<param>`,
buffers outside the state dict) and the parameter is rewritten as `base + sum_i scale_i * D_i` whenever
a strength or switch changes. Switching them off therefore gives `base` back bit for bit, the model's
keys never change, and `merge_lora` / `unmerge_lora` leave them as they are (they are always merged).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Target groups per model family: {group: [(module regex, which rows)]}; rows "qkv" = the first
# 3 * in_features rows (q, k, v of a fused projection), "mlp" = the rest, None = all.
TARGET_GROUPS: dict[str, dict[str, list[tuple[str, str | None]]]] = {
    "flux": {
        "attn": [
            (r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)", None),
            (r"single_blocks\.\d+\.linear1", "qkv"),
            (r"single_blocks\.\d+\.linear2", None),
        ],
        "mlp": [(r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)", None), (r"single_blocks\.\d+\.linear1", "mlp")],
        "mod": [(r"double_blocks\.\d+\.(img|txt)_mod\.lin", None), (r"single_blocks\.\d+\.modulation\.lin", None)],
    },
    "sd3": {
        "attn": [(r"joint_blocks\.\d+\.(context|x)_block\.attn2?\.(qkv|proj)", None)],
        "mlp": [(r"joint_blocks\.\d+\.(context|x)_block\.mlp\.fc(1|2)", None)],
        "mod": [(r"joint_blocks\.\d+\.(context|x)_block\.adaLN_modulation\.1", None)],
    },
}
# FLUX.2: FLUX.1's blocks and names, but one modulation per kind of block, shared by all (mmdit/flux2.py)
TARGET_GROUPS["flux2"] = {
    **TARGET_GROUPS["flux"],
    "mod": [(r"(double_stream_modulation_(img|txt)|single_stream_modulation)\.lin", None)],
}
DEFAULT_TARGETS = ("attn",)  # the paper's choice: every attention projection of both streams


class LoRA(nn.Module):
    """One adapter on rows `[offset, offset + length)` of a Linear: `delta(x) = scale * B A dropout(x)`."""

    def __init__(
        self, in_features: int, rows: tuple[int, int], rank: int, alpha: float, dropout: float = 0.0,
        device=None, dtype=None,
    ):
        super().__init__()
        self.offset, self.length = rows
        self.rank, self.alpha = rank, float(alpha)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.length, rank, device=device, dtype=dtype))  # (length, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear; B = 0 makes the start exact
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.strength, self.enabled = 1.0, True
        self.merged: float | None = None  # the scale folded into the base weight, if merged
        # the effective multiplier, read at forward so toggling never changes the module's code
        self.register_buffer("scale", torch.tensor(self.alpha / rank, device=device), persistent=False)

    def refresh(self) -> None:
        if self.merged is not None:
            raise RuntimeError("this LoRA is merged into the weights: unmerge_lora(model) before changing it")
        with torch.no_grad():
            self.scale.fill_(self.strength * self.alpha / self.rank * self.enabled)

    def delta_weight(self) -> Tensor:
        """`scale * B A` in float32: (length, in)."""
        return self.scale.float() * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: Tensor, out_features: int) -> Tensor:
        """(..., in) -> (..., out_features): the update, zero outside the adapter's rows."""
        h = F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A), self.lora_B)  # (..., length)
        return F.pad(h * self.scale, (self.offset, out_features - self.offset - self.length))

    def extra_repr(self) -> str:
        return f"rows=[{self.offset}, {self.offset + self.length}), rank={self.rank}, alpha={self.alpha:g}"


class LoRALinear(nn.Linear):
    """`nn.Linear` with named LoRA adapters in `self.lora`; weight and bias keep their keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.lora = nn.ModuleDict()

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "LoRALinear":
        """A LoRALinear sharing `linear`'s parameters (nothing is copied)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new.train(linear.training)

    def add(self, name: str, rank: int, alpha: float, rows: tuple[int, int] | None = None,
            dropout: float = 0.0, dtype: torch.dtype | None = None) -> LoRA:
        if "." in name or not name:
            raise ValueError(f"adapter name {name!r}: must be non-empty and without '.'")
        if name in self.lora:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        a = LoRA(self.in_features, rows or (0, self.out_features), rank, alpha, dropout,
                 self.weight.device, dtype or self.weight.dtype)
        self.lora[name] = a
        return a

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)  # (..., out)
        for a in self.lora.values():
            if a.merged is None:
                y = y + a(x, self.out_features).to(y.dtype)
        return y


class WeightDelta(nn.Module):
    """One adapter's full-weight delta on rows `[offset, offset + len(D))` of one parameter: `p += scale * D`."""

    def __init__(self, delta: Tensor, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.register_buffer("delta", delta, persistent=False)  # D: the parameter's shape, or a row slice of it
        self.strength, self.enabled = 1.0, True

    @property
    def scale(self) -> float:
        return self.strength * self.enabled

    def extra_repr(self) -> str:
        return f"shape={list(self.delta.shape)}, offset={self.offset}"


class ParamDeltas(nn.Module):
    """The deltas on one parameter: it holds `base + sum_i scale_i * D_i`, computed in float32 from `base`."""

    def __init__(self, param: Tensor):
        super().__init__()
        self.register_buffer("base", param.detach().clone(), persistent=False)  # the value without deltas
        self.deltas = nn.ModuleDict()  # adapter name -> WeightDelta
        self.written: tuple | None = None  # the scales last written into the parameter

    @torch.no_grad()
    def write(self, param: Tensor) -> None:
        """Rewrite `param` from `base` if a scale changed since the last write."""
        scales = tuple((n, d.scale) for n, d in self.deltas.items())
        if scales == self.written:
            return
        w = self.base.to(torch.float32, copy=True)
        for d in self.deltas.values():
            if d.scale:
                rows = w if d.delta.dim() == 0 else w[d.offset : d.offset + d.delta.shape[0]]
                rows += d.scale * d.delta.float()
        param.copy_(w.to(param.dtype))
        self.written = scales


# ---- model-level helpers ----


def _linears(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def adapters(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, str, LoRA]]:
    """(module name, adapter name, adapter) for every adapter (of `name`, if given)."""
    for mod_name, m in _linears(model):
        for n, a in m.lora.items():
            if name is None or n == name:
                yield mod_name, n, a


def param_deltas(model: nn.Module) -> Iterator[tuple[nn.Module, str, ParamDeltas]]:
    """(owning module, parameter name, its ParamDeltas) for every parameter with full-weight deltas."""
    for owner in model.modules():
        table = owner._modules.get("lora_deltas")
        if table is not None:
            for pname, record in table.items():
                yield owner, pname, record


def weight_deltas(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, WeightDelta]]:
    """(adapter name, delta) for every full-weight delta (of adapter `name`, if given)."""
    for _, _, record in param_deltas(model):
        for n, d in record.deltas.items():
            if name is None or n == name:
                yield n, d


def adapter_names(model: nn.Module) -> list[str]:
    return sorted({n for _, n, _ in adapters(model)} | {n for n, _ in weight_deltas(model)})


def _require(model: nn.Module, name: str) -> list[LoRA | WeightDelta]:
    found = [a for _, _, a in adapters(model, name)] + [d for _, d in weight_deltas(model, name)]
    if not found:
        raise KeyError(f"no LoRA adapter {name!r} in the model (adapters: {adapter_names(model) or 'none'})")
    return found


def _refresh(model: nn.Module, parts: Iterable[LoRA | WeightDelta]) -> None:
    """Make new strengths and switches take effect: LoRA scale buffers, then the weights that carry deltas."""
    for a in parts:
        if isinstance(a, LoRA):
            a.refresh()
    for owner, pname, record in param_deltas(model):
        record.write(getattr(owner, pname))


def add_weight_delta(model: nn.Module, param: str, name: str, delta: Tensor, offset: int = 0) -> WeightDelta:
    """Add `delta` to rows `[offset, offset + len(delta))` of parameter `param` (e.g. `...query_norm.scale`)
    as part of adapter `name`, and write it into the weight (strength 1; `set_lora_scale` changes it).

    delta: the parameter's shape, or a slice of its rows (dim 0); stored in the parameter's dtype and device.
    ValueError if the shapes do not fit or the adapter already has a delta there.
    """
    owner_name, _, pname = param.rpartition(".")
    owner = model.get_submodule(owner_name)
    p = getattr(owner, pname, None)
    if not isinstance(p, nn.Parameter):
        raise ValueError(f"{param} is not a parameter of the model")
    fits = delta.shape == p.shape if p.dim() == 0 or delta.dim() == 0 else (
        delta.shape[1:] == p.shape[1:] and 0 <= offset and offset + delta.shape[0] <= p.shape[0])
    if not fits:
        raise ValueError(f"a delta of shape {list(delta.shape)} at row {offset} does not fit {param} {list(p.shape)}")
    if "lora_deltas" not in owner._modules:
        owner.add_module("lora_deltas", nn.ModuleDict())
    if pname not in owner.lora_deltas:
        owner.lora_deltas[pname] = ParamDeltas(p)
    record = owner.lora_deltas[pname]
    if name in record.deltas:
        raise ValueError(f"adapter {name!r} already has a delta on {param}")
    d = record.deltas[name] = WeightDelta(delta.detach().to(device=p.device, dtype=p.dtype), offset)
    record.write(p)
    return d


def _add_to_weight(module: nn.Module, pname: str, offset: int, value: Tensor) -> None:
    """`p[offset : offset + len(value)] += value` (float32 math), kept in `base` too when `p` carries deltas."""
    records = module._modules.get("lora_deltas")
    p = getattr(module, pname)
    targets = [p] + ([records[pname].base] if records is not None and pname in records else [])
    for t in targets:
        rows = t[offset : offset + value.shape[0]]
        rows.copy_((rows.float() + value).to(t.dtype))


def wrap_linear(model: nn.Module, module_name: str) -> LoRALinear:
    """The Linear `module_name` of `model`, replaced in place by a LoRALinear if it is not one yet."""
    m = model.get_submodule(module_name)
    if isinstance(m, LoRALinear):
        return m
    if not isinstance(m, nn.Linear):
        raise TypeError(f"{module_name} is a {type(m).__name__}, not a Linear: LoRA applies to Linears only")
    parent_name, _, child = module_name.rpartition(".")
    new = LoRALinear.wrap(m)
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


def resolve_targets(model: nn.Module, targets: str | Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """{module name: (offset, length)} for target group names of `model.family` (`attn`, `mlp`, `mod`) or
    module regexes; ValueError for a group of another family or targets that match no Linear."""
    targets = [targets] if isinstance(targets, str) else list(targets or DEFAULT_TARGETS)
    family = model.family
    groups = TARGET_GROUPS.get(family, {})
    rules: list[tuple[str, str | None]] = []
    for t in targets:
        if t in groups:
            rules += groups[t]
        elif any(t in g for g in TARGET_GROUPS.values()):
            raise ValueError(f"no LoRA target group {t!r} for a model of family {family!r}")
        else:
            rules.append((t, None))  # a regex over module names
    out: dict[str, tuple[int, int]] = {}
    for mod_name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        spans = []
        for pat, rows in rules:
            if re.fullmatch(pat, mod_name):
                split = 3 * m.in_features
                spans.append({None: (0, m.out_features), "qkv": (0, split), "mlp": (split, m.out_features)}[rows])
        if spans:  # contiguous groups on one Linear (linear1's qkv + mlp) become one span
            lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
            out[mod_name] = (lo, hi - lo)
    if not out:
        raise ValueError(f"LoRA targets {targets} match no Linear of the model")
    return out


def inject_lora(
    model: nn.Module,
    name: str = "default",
    rank: int = 16,
    alpha: float | None = None,
    targets: str | Iterable[str] | None = None,
    dropout: float = 0.0,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Add a trainable adapter (A kaiming-uniform, B zero: the model is unchanged) to every target.

    targets: group names of the model's family (`attn` (default), `mlp`, `mod`) and/or regexes
    fully matching module names. alpha defaults to rank (scale 1). dtype defaults to the weights'.
    Returns the names of the modules that got the adapter.
    """
    if name in adapter_names(model):
        raise ValueError(f"the model already has a LoRA adapter {name!r}")
    spans = resolve_targets(model, targets)
    for mod_name, (offset, length) in spans.items():
        wrap_linear(model, mod_name).add(name, rank, alpha or rank, (offset, length), dropout, dtype)
    return list(spans)


def set_lora_scale(model: nn.Module, name: str, scale: float) -> None:
    """The user strength of adapter `name` (the update is `scale * alpha / rank * B A`, `scale * D` for deltas)."""
    parts = _require(model, name)
    for a in parts:
        a.strength = float(scale)
    _refresh(model, parts)


def set_lora_enabled(model: nn.Module, enabled: bool | Iterable[str]) -> None:
    """All adapters on or off (a bool), or exactly the named ones on."""
    on = (lambda n: enabled) if isinstance(enabled, bool) else (lambda n, s=set(enabled): n in s)
    if not isinstance(enabled, bool):
        missing = set(enabled) - set(adapter_names(model))
        if missing:
            raise KeyError(f"no LoRA adapter(s) {sorted(missing)} in the model (adapters: {adapter_names(model)})")
    parts = [(n, a) for _, n, a in adapters(model)] + list(weight_deltas(model))
    for n, a in parts:
        a.enabled = on(n)
    _refresh(model, [a for _, a in parts])


@contextmanager
def lora_enabled(model: nn.Module, enabled: bool | Iterable[str]):
    """`with lora_enabled(model, False): ...` runs the base model; the previous states come back after."""
    before = [(a, a.enabled) for _, _, a in adapters(model)] + [(d, d.enabled) for _, d in weight_deltas(model)]
    set_lora_enabled(model, enabled)
    try:
        yield model
    finally:
        for a, e in before:
            a.enabled = e
        _refresh(model, [a for a, _ in before])


@torch.no_grad()
def merge_lora(model: nn.Module, name: str | None = None) -> None:
    """Fold the enabled adapters (or only `name`) into the base weights at their current scale.
    Full-weight deltas are in the weights already: they are left as they are."""
    for mod_name, _, a in adapters(model, name):
        if a.merged is None and a.enabled:
            _add_to_weight(model.get_submodule(mod_name), "weight", a.offset, a.delta_weight())
            a.merged = a.scale.item()


@torch.no_grad()
def unmerge_lora(model: nn.Module, name: str | None = None) -> None:
    """Subtract what `merge_lora` added; the adapters run unmerged again (deltas stay in the weights)."""
    for mod_name, _, a in adapters(model, name):
        if a.merged is not None:
            delta = a.merged * (a.lora_B.float() @ a.lora_A.float())
            _add_to_weight(model.get_submodule(mod_name), "weight", a.offset, -delta)
            a.merged = None


@torch.no_grad()
def remove_lora(model: nn.Module, name: str) -> None:
    """Delete adapter `name` (unmerged first if it was merged); the parameters it had deltas on get their
    value without them back."""
    unmerge_lora(model, name)
    for mod_name, _, _ in list(adapters(model, name)):
        del model.get_submodule(mod_name).lora[name]
    for owner, pname, record in list(param_deltas(model)):
        if name in record.deltas:
            del record.deltas[name]
            record.write(getattr(owner, pname))
            if not len(record.deltas):
                del owner.lora_deltas[pname]
                if not len(owner.lora_deltas):
                    del owner.lora_deltas


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The A and B matrices of every adapter (or of `name`): what the optimizer trains."""
    return [p for _, _, a in adapters(model, name) for p in (a.lora_A, a.lora_B)]


def lora_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter `name` as `<module>.lora_A.weight`, `.lora_B.weight` (B zero-padded to all output rows
    of the module, so a row-slice adapter needs no offset) and `.alpha`, and its full-weight deltas as
    `<module>.diff` (a weight), `<module>.diff_b` (a bias), `<parameter>.diff` (others; zero-padded to
    the whole parameter): the BFL/ComfyUI LoRA layout without its `diffusion_model.` prefix, which
    `convert.load_lora` reads back."""
    _require(model, name)
    out = {}
    for mod_name, _, a in adapters(model, name):
        out_features = model.get_submodule(mod_name).out_features
        out[f"{mod_name}.lora_A.weight"] = a.lora_A.detach()
        out[f"{mod_name}.lora_B.weight"] = F.pad(a.lora_B.detach(), (0, 0, a.offset, out_features - a.offset - a.length))
        out[f"{mod_name}.alpha"] = torch.tensor(a.alpha)
    owners = {id(m): n for n, m in model.named_modules()}
    for owner, pname, record in param_deltas(model):
        if name in record.deltas:
            d, p = record.deltas[name], getattr(owner, pname)
            full = torch.zeros_like(p)
            (full if d.delta.dim() == 0 else full[d.offset : d.offset + d.delta.shape[0]]).copy_(d.delta)
            mod = owners[id(owner)]
            key = {"weight": f"{mod}.diff", "bias": f"{mod}.diff_b"}.get(pname, f"{mod}.{pname}.diff")
            out[key.removeprefix(".")] = full.detach()
    return out
