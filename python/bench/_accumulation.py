"""The accumulation axis of the memory suite: ``oplora-bench --suite memory --accumulation 1,2,4,8,16``.

On a SmolLM2-135M-shaped model (``oplora.bench._smollm``: built from its config, random
weights; PEFT LoRA r8 on q, k, v, o), micro-batches of ``batch`` x ``seq`` random tokens are
accumulated before one ``step()``, for AdamW and for OPLoRA and ScaledOPLoRA holding the captured
rows (``capture="rows"``) or the cheaper of rows and the dense gradient (``capture="auto"``,
the default). Per configuration and number of micro-batches, in the second step (the state
exists):

* **held** -- live bytes after the last ``backward()`` minus live bytes after ``zero_grad()``:
  the factor gradients, plus what the capture holds (``opt.capture_bytes()`` is reported too);
* **peak** -- model parameters + the highest live bytes during the accumulation and the step;
* **step s** -- the wall time of ``opt.step()``, and **fwd+bwd s** per micro-batch, both
  measured inside the memory trace (the profiler slows every allocation a little, alike for all);
* **bound** -- SPEC section 3's ``sum over layers of min(T (m + n), m n) x 4`` bytes.

Live bytes are counted as in the rest of the suite (:class:`oplora.bench.memory.MemoryTrace`).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..memory_model import capture_memory
from ._common import format_table
from ._smollm import ALL_LINEAR, ATTENTION, BUDGETED, OPTIMIZERS, SHAPES, loss_of, lora_model, token_batches

__all__ = ["CONFIGS", "measure", "table", "plot"]

MiB = 2.0**20

#: (label, optimizer builder); the capture mode is part of the label (the model suite's too):
#: ``budget0`` is ``capture_budget=0`` (every layer whose rows outweigh its sketch is sketched).
CONFIGS = {**OPTIMIZERS, **BUDGETED}
#: ``--targets``: the LoRA targets by name.
TARGETS = {"attention": ATTENTION, "all": ALL_LINEAR}


def _lora_shapes(model: nn.Module, targets: Sequence[str] = ATTENTION) -> List[Tuple[int, int]]:
    """(m, n) of every LoRA layer of a PEFT model."""
    return [(mod.out_features, mod.in_features) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.endswith(tuple(f"{t}.base_layer" for t in targets))]


def counted(config: str, model: nn.Module, tokens: int, micro: int) -> int:
    """What :func:`oplora.memory_model.capture_memory` counts for ``config``'s capture (bytes)."""
    if config == "AdamW":
        return 0
    est = capture_memory(model, tokens=tokens, micro_batches=micro, activation_dtype=torch.float32,
                         stats=config.startswith("Scaled"))
    return {"rows": est.rows, "auto": est.auto, "budget0": est.bounded}[config.split()[-1]]


def measure(config: str, micro: int, *, layers: int, r: int, batch: int, seq: int, device: torch.device,
            trace_cls, shape: str = "smollm2-135m", targets: str = "attention") -> Dict[str, object]:
    """One row: ``micro`` micro-batches accumulated into the second step of ``config``."""
    model = lora_model(r=r, layers=layers, device=device, what="memory --accumulation", shape=shape,
                       targets=TARGETS[targets])
    batches = token_batches(micro + 1, batch, seq, device=device, vocab=SHAPES[shape]["vocab_size"])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with trace_cls(device) as trace:
        opt = CONFIGS[config](model)
        loss_of(model, batches[0]).backward()  # the first step creates the optimizer state
        opt.step()
        opt.zero_grad(set_to_none=True)
        with trace.phase("accumulate"):
            t0 = time.perf_counter()
            for ids in batches[1:]:
                loss_of(model, ids).backward()
            fwd_bwd = (time.perf_counter() - t0) / micro
        held_capture = opt.capture_bytes() if hasattr(opt, "capture_bytes") else 0
        with trace.phase("step"):
            t0 = time.perf_counter()
            opt.step()
            step_s = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "close"):
            opt.close()
    acc, stp = trace.phases["accumulate"], trace.phases["step"]
    tokens = micro * batch * seq
    bound = sum(min(tokens * (m + n), m * n) * 4 for m, n in _lora_shapes(model, TARGETS[targets]))
    return {"config": config, "shape": shape, "targets": targets, "micro_batches": micro, "tokens_per_step": tokens,
            "layers": layers, "r": r, "held_bytes": acc.end - acc.start, "capture_bytes": held_capture,
            "counted_bytes": counted(config, model, batch * seq, micro), "bound_bytes": bound,
            "peak_bytes": params + max(acc.peak, stp.peak), "model_bytes": params,
            "fwd_bwd_s": fwd_bwd, "step_s": step_s}


def run(micro_counts: Sequence[int], configs: Sequence[str], *, layers: int, r: int, batch: int, seq: int,
        device: torch.device, trace_cls, log: Optional[Callable[[str], None]] = None, shape: str = "smollm2-135m",
        targets: str = "attention") -> List[Dict[str, object]]:
    rows = []
    for config in configs:
        for micro in micro_counts:
            rows.append(measure(config, micro, layers=layers, r=r, batch=batch, seq=seq, device=device,
                                trace_cls=trace_cls, shape=shape, targets=targets))
            if log is not None:
                row = rows[-1]
                log(f"  {config:18s} x{micro:<3d} held {row['held_bytes'] / MiB:8.1f} MiB, peak "
                    f"{row['peak_bytes'] / MiB:8.1f} MiB, step {row['step_s'] * 1e3:7.1f} ms")
    return rows


HEADER = ["config", "micro-batches", "tokens", "held MiB", "capture MiB", "counted MiB", "bound MiB", "peak MiB",
          "peak / AdamW", "fwd+bwd s", "step ms"]


def table(rows: Sequence[Dict[str, object]], markdown: bool = False) -> str:
    adamw = {r["micro_batches"]: r["peak_bytes"] for r in rows if r["config"] == "AdamW"}
    body = [[r["config"], str(r["micro_batches"]), str(r["tokens_per_step"]), f"{r['held_bytes'] / MiB:.1f}",
             f"{r['capture_bytes'] / MiB:.1f}", f"{r['counted_bytes'] / MiB:.1f}", f"{r['bound_bytes'] / MiB:.1f}",
             f"{r['peak_bytes'] / MiB:.1f}",
             f"{r['peak_bytes'] / adamw[r['micro_batches']]:.3f}" if r["micro_batches"] in adamw else "",
             f"{r['fwd_bwd_s']:.2f}", f"{r['step_s'] * 1e3:.1f}"] for r in rows]
    return format_table(HEADER, body, markdown=markdown)


def plot(rows: Sequence[Dict[str, object]], path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    from ._common import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        micro = [r["micro_batches"] for r in mine]
        style = "--" if config.endswith("rows") else "-"
        axes[0].plot(micro, [r["held_bytes"] / MiB for r in mine], style, marker="o", label=config)
        axes[1].plot(micro, [r["peak_bytes"] / MiB for r in mine], style, marker="o", label=config)
        axes[2].plot(micro, [r["step_s"] * 1e3 for r in mine], style, marker="o", label=config)
    first = [r for r in rows if r["config"] == rows[0]["config"]]
    axes[0].plot([r["micro_batches"] for r in first], [r["bound_bytes"] / MiB for r in first], ":", color="k",
                 label="bound: sum min(T(m+n), mn) x 4 B")
    for ax, label in zip(axes, ("held between backward and step [MiB]", "peak [MiB]", "optimizer step [ms]")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batches accumulated per step")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    save_figure(fig, path, title)
