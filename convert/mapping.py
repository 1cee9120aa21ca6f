"""Key mapping from another layout to ours: a few regex rules plus the exceptions.

A `KeyMap` turns source keys into our keys with
- `renames`: `(pattern, replacement)` regexes, tried in order, first match wins;
- `fused`: `(pattern, replacement, part)`: several source tensors concatenated along dim 0 into one
  of ours (e.g. Diffusers' `to_q`, `to_k`, `to_v` -> our fused `qkv`), `part` giving the order;
- `swap`: our keys whose two row halves are swapped (adaLN `scale, shift` -> `shift, scale`).
Every source key must match a rule: the error names the first that does not.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .files import Checkpoint, CheckpointError


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """`[a; b] -> [b; a]` along dim 0: Diffusers' `AdaLayerNormContinuous` is (scale, shift), ours (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat((b, a), dim=0)


@dataclass
class KeyMap:
    renames: list[tuple[str, str]]
    fused: list[tuple[str, str, int]] = field(default_factory=list)
    swap: list[str] = field(default_factory=list)  # regexes over *our* keys

    def plan(self, keys, source: str | None = None) -> dict[str, list[str]]:
        """{our key: [source keys]} (one source, or the ordered parts of a fused tensor).

        keys: a Checkpoint or key names; errors name `source` (default: the Checkpoint's file).
        """
        source = source or getattr(keys, "source", "checkpoint")
        out: dict[str, list[str]] = {}
        parts: dict[str, dict[int, str]] = {}
        for k in keys:
            for pat, rep, part in self.fused:
                if re.fullmatch(pat, k):
                    parts.setdefault(re.sub(pat, rep, k), {})[part] = k
                    break
            else:
                for pat, rep in self.renames:
                    if re.fullmatch(pat, k):
                        out[re.sub(pat, rep, k)] = [k]
                        break
                else:
                    raise CheckpointError(f"{source}: unexpected key {k!r}: no rule maps it to this model's layout")
        for ours, p in parts.items():
            if sorted(p) != list(range(len(p))) or len(p) < 2:
                raise CheckpointError(f"{source}: incomplete fused tensor {ours!r}: found only {sorted(p.values())}")
            out[ours] = [p[i] for i in range(len(p))]
        return out

    def tensors(self, ckpt: Checkpoint, dtype=None, device="cpu") -> dict[str, Callable[[], torch.Tensor]]:
        """Lazy loaders of our tensors from `ckpt`, for `load_state_dict_strict`."""
        def loader(ours, srcs):
            def load():
                ts = [ckpt.load(s, dtype, device) for s in srcs]
                t = ts[0] if len(ts) == 1 else torch.cat(ts, dim=0)
                if any(re.fullmatch(p, ours) for p in self.swap):
                    t = swap_halves(t)
                return t
            return load
        return {ours: loader(ours, srcs) for ours, srcs in self.plan(ckpt).items()}
