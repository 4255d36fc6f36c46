"""``print(opt)``: one summary of what an oplora optimizer trains and how (instead of torch's dump
of every param group, whose LoRA group lists hundreds of tensors).

    OPLoRA: 120 LoRA layers (r=8), 1,658,880 factor numbers
      hyper-parameters: lr=0.001, momentum=0.9, dampening=0, iters=1, prox=0.01, ...
      LoRA layers: 120 PEFT linear: q_proj x30, k_proj x30, v_proj x30, o_proj x30
      other parameters: 2 tensors, 1,152 numbers, by AdamW (lr=0.001, betas=(0.9, 0.999), ...)
      left to AdamW (not captured): model.x.lora[default]: DoRA (magnitude vector)
      capture: 'auto', holding 0 B now; steps taken: 12
      backend: cpu -> cpp
"""

from __future__ import annotations

import re
from collections import Counter
from typing import List

__all__ = ["summary"]

#: what a torch optimizer's summary shows (the rest are implementation switches).
_INNER_KEYS = ("lr", "momentum", "betas", "eps", "weight_decay", "nesterov")
#: param group entries that are not hyper-parameters.
_BOOKKEEPING = {"params", "kind", "initial_lr"}


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "(" + ", ".join(_value(x) for x in v) + ")"
    return repr(v)


def _hyper(group: dict, keys) -> str:
    return ", ".join(f"{k}={_value(group[k])}" for k in keys if k in group and k not in _BOOKKEEPING)


def _layer_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj[default]`` -> ``q_proj``."""
    return re.sub(r"\[.*\]$", "", name).rsplit(".", 1)[-1] or name


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"


def summary(opt) -> str:
    """The text of ``repr(opt)`` for an :class:`oplora.optim.base.LoRAOptimizer`."""
    from .. import backends as _backend  # the dispatch module, read only (nothing is loaded)

    name = type(opt).__name__
    sites, group = opt._sites, opt.lora_group
    ranks = sorted({site.b.shape[1] for site in sites})
    numbers = sum(site.A.numel() + site.B.numel() for site in sites)
    lines = [f"{name}: {len(sites)} LoRA layers (r={'/'.join(map(str, ranks))}), {numbers:,} factor numbers",
             f"  hyper-parameters: {_hyper(group, opt._hyper)}"]
    kinds: List[str] = []
    for kind, count in Counter(site.kind for site in sites).items():
        names = Counter(_layer_name(site.name) for site in sites if site.kind == kind)
        listed = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in names.most_common(8))
        more = f", ... ({len(names) - 8} more names)" if len(names) > 8 else ""
        kinds.append(f"{count} {kind}: {listed}{more}")
    lines.append(f"  LoRA layers: {'; '.join(kinds)}")
    frozen = [site.name for site in sites if not site.trainable]
    if frozen:
        lines.append(f"  frozen now (trained at the steps they require grad): {len(frozen)}")
    for kind, inner in sorted(opt._inner.items(), key=lambda kv: kv[0] != "lora"):
        (g,) = inner.param_groups
        settings = f"{type(inner).__name__} ({_hyper(g, _INNER_KEYS)})"
        if kind == "lora":
            lines.append(f"  base optimizer of the LoRA factors: {settings}")
        else:
            lines.append(f"  other parameters: {len(g['params'])} tensors, {sum(p.numel() for p in g['params']):,} "
                         f"numbers, by {settings}")
    if "other" not in opt._inner:
        lines.append("  other parameters: none trainable")
    if opt._unsupported:
        other = type(opt._inner["other"]).__name__ if "other" in opt._inner else "the other optimizer"
        listed = "; ".join(f"{n}: {why}" for n, why in opt._unsupported)
        lines.append(f"  left to {other} (not captured): {listed}")
    steps = max((int(opt.state.get(site.B, {}).get("step", 0)) for site in sites), default=0)
    if opt._capture is not None:
        closed = opt._capture.closed_because
        held = "closed: " + closed if closed else f"holding {_bytes(opt.capture_bytes())} now"
        cap = opt._capture
        if cap.budget is not None:
            budget = f"{cap.budget:.0%} of free memory" if isinstance(cap.budget, float) else _bytes(cap.budget)
            sketched = sum(type(site.folded).__name__ == "Sketch" for site in opt._sites)
            held += f" (capture_budget {budget}, sketch_rank {cap.sketch_rank}; {sketched} layers sketched now)"
        lines.append(f"  capture: {cap.mode!r}, {held}; steps taken: {steps}")
    else:
        lines.append(f"  capture: none (steps from the factors' .grad); steps taken: {steps}")
    devices = sorted({site.B.device.type for site in sites})
    selected = _backend.backend_info()["selected"]
    lines.append("  backend: " + ", ".join(f"{d} -> {selected.get(d, 'torch')}" for d in devices))
    return "\n".join(lines)
