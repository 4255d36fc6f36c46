"""How ``oplora-bench --suite kernels`` reports: its table, the targets it checks and its plot
(``oplora.bench.kernels`` measures; this module only formats).

The targets (SPEC section 4, issue 19), each a line of :func:`targets`:
  * fused row pass at most 1.5x its bandwidth floor;
  * OPLoRA step of a scope at most 1.5x its own floor (the bytes of its row passes over the
    measured bandwidth) and at most 5% of a forward+backward over the same tokens, counted as
    ``6 x params x tokens`` FLOPs (``params``: the frozen weights ``m x n`` of the scope's layers)
    at the measured bf16 matmul rate. AdamW's step is no yardstick: it reads no activations
    (its ``x adamw`` column is kept for reference);
  * LoRSum (iters 1) at 4096^2, r 16 at least 1000x faster than the full SVD and at least 5x
    faster than ``torch.svd_lowrank``, both including the time to form the explicit matrix.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

from . import lorsum as lorsum_bench
from ._common import format_table, save_figure


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{1e3 * seconds:.3f}"


def kernel_table(rows: Sequence[Dict], markdown: bool = False) -> str:
    header = ["scope", "provider", "layers", "median ms", "min-max ms", "MB moved", "floor ms", "x floor",
              "% fwd+bwd", "x adamw", "ops + launches"]
    body = [[r["scope"], r["provider"], str(r["layers"]), _ms(r["time_median_s"]),
             f"{_ms(r['time_min_s'])}-{_ms(r['time_max_s'])}", f"{r['bytes'] / 1e6:.1f}", _ms(r["floor_s"]),
             f"{r['x_floor']:.2f}", f"{100 * r['x_fwd_bwd']:.2f}", f"{r['x_adamw']:.2f}",
             f"{r['tensor_ops']} + {r['triton_launches']}"]
            for r in rows]
    return format_table(header, body, markdown=markdown)


def targets(rows: Sequence[Dict], svd_rows: Sequence[Dict]) -> List[str]:
    """The targets (module docstring), as lines of text with the measured ratios."""
    by = {(r["scope"], r["provider"]): r for r in rows}
    lines = []
    for scope in dict.fromkeys(r["scope"] for r in rows):
        rp = by[(scope, "row pass triton")]
        st = by[(scope, "oplora step triton")]
        lines.append(f"{scope}: fused row pass {rp['x_floor']:.2f}x its bandwidth floor (target <= 1.5); "
                     f"OPLoRA step {st['x_floor']:.2f}x its floor (target <= 1.5) and "
                     f"{100 * st['x_fwd_bwd']:.2f}% of a forward+backward over the same tokens "
                     f"({_ms(st['fwd_bwd_s'])} ms = 6 x {st['params'] / 1e9:.3g}G params x {st['tokens']} tokens "
                     f"at the measured bf16 matmul rate; target <= 5%); torch path / Triton: "
                     f"{by[(scope, 'oplora step torch')]['time_median_s'] / st['time_median_s']:.2f}")
    svd = {r["provider"]: r for r in svd_rows}
    if svd:
        lor, low = svd["lorsum iters=1"], svd["torch.svd_lowrank"]
        low_formed = (low["time_median_s"] + low["form_time_s"]) / lor["time_median_s"]
        lines.append(f"LoRSum iters=1 at {lorsum_bench.row_label(lor)}: {lor['speedup_vs_form_svd']:.0f}x faster than "
                     f"forming T + torch.linalg.svd ({lor['speedup_vs_svd']:.0f}x the SVD alone; target >= 1000); "
                     f"{low_formed:.1f}x faster than forming T + torch.svd_lowrank (target >= 5); rel err "
                     f"{lor['rel_err']:.1e} vs svd_lowrank {low['rel_err']:.1e}")
    return lines


def plot(rows: Sequence[Dict], svd_rows: Sequence[Dict], path: str, title: str) -> None:
    """Per scope, each provider's median time with its bandwidth floor; LoRSum vs SVD times."""
    import matplotlib.pyplot as plt

    scopes = list(dict.fromkeys(r["scope"] for r in rows))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        pts = [(scopes.index(r["scope"]), r["time_median_s"], r["floor_s"]) for r in rows if r["provider"] == name]
        xs = [x + (i - len(names) / 2 + 0.5) * width for x, _, _ in pts]
        ax1.bar(xs, [t for _, t, _ in pts], width, label=name)
        ax1.scatter(xs, [f for _, _, f in pts], marker="_", color="black", s=80, zorder=3,
                    label="bandwidth floor" if i == 0 else None)
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(scopes)))
    ax1.set_xticklabels(scopes)
    ax1.set_ylabel("median time per call [s]")
    ax1.set_title("fused Triton vs torch path vs AdamW (black: bytes / measured bandwidth)")
    ax1.grid(True, axis="y", which="both", alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    if svd_rows:
        ax2.bar(range(len(svd_rows)), [r["time_median_s"] for r in svd_rows])
        ax2.set_xticks(range(len(svd_rows)))
        ax2.set_xticklabels([r["provider"] for r in svd_rows], rotation=45, ha="right", fontsize=7)
        ax2.set_yscale("log")
        ax2.set_title(f"LoRSum vs SVD, {lorsum_bench.row_label(svd_rows[0])}", fontsize=9)
        ax2.grid(True, axis="y", which="both", alpha=0.3)
    save_figure(fig, path, title)
