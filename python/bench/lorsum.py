"""LoRSum vs SVD: how much faster than an SVD is LoRSum, and how close does it get?

Each case is a realistic OPLoRA step target for one LoRA layer (m x n, rank r, ``tokens`` rows):

    T = B0 A0 - lr * s D^T X - lr * mu * Um Vm

with balanced factors ``B0, A0`` (singular values from 1 down to 0.1), activations ``X`` whose
column scales decay like ``1/sqrt(j)``, output gradients ``D``, a rank-r momentum ``(Um, Vm)``
(mu = 0.9) and ``lr`` set so that the step is ``--step-ratio`` (default 5%) of ``||B0 A0||_F``.

Providers, side by side, each returning rank-r factors ``(B, A)``:
  * ``lorsum iters=k`` (k = 0, 1, 2): ``oplora.lorsum`` on the thin terms, warm-started at
    ``(B0, A0)``, prox = ``--prox`` (default 0: the truncated SVD is the target). It never forms
    T; its time is the whole call, input validation included.
  * ``form T``: building the explicit m x n matrix, which both SVD providers need first.
  * ``torch.linalg.svd``: full SVD of the explicit T, truncated to r (balanced factors).
  * ``torch.svd_lowrank``: randomized SVD of the explicit T, ``q = r + --oversample``,
    ``niter = 2``, truncated to r.
SVD times exclude forming T (``form_time_s`` holds it; ``speedup_vs_form_svd`` counts it).

Accuracy (untimed, float64): ``rel_err = ||B A - P*||_F / ||P*||_F`` against the optimum
``P*`` = truncated rank-r SVD of T in float64, and ``objective_ratio = ||T - B A||_F / ||T - P*||_F``
(1 is optimal).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import oplora
from ._common import (choose_device, format_table, machine_info, markdown_header, measure, save_figure, suite_parser,
                      write_results)

MOMENTUM = 0.9


@dataclass(frozen=True)
class Case:
    m: int
    n: int
    r: int
    tokens: int

    @property
    def label(self) -> str:
        return case_label(self.m, self.n, self.r, self.tokens)


def case_label(m, n, r, tokens, sep: str = " ") -> str:
    """``MxN rR TTOKENS``: how a case is named in the progress bar, the tables and the plot."""
    return f"{m}x{n}{sep}r{r} T{tokens}"


def row_label(row: Dict[str, object], sep: str = " ") -> str:
    return case_label(row["m"], row["n"], row["r"], row["tokens"], sep)


# Default grids: square scaling at r = 16, ranks 8/64, token counts, rectangular (MLP) layers.
CPU_GRID = [Case(512, 512, 16, 2048), Case(1024, 1024, 16, 2048), Case(2048, 2048, 16, 2048),
            Case(2048, 2048, 8, 2048), Case(2048, 2048, 64, 2048),
            Case(1024, 1024, 16, 512), Case(1024, 1024, 16, 4096),
            Case(3072, 768, 16, 2048), Case(768, 3072, 16, 2048)]
CUDA_GRID = [Case(1024, 1024, 16, 4096), Case(2048, 2048, 16, 4096), Case(4096, 4096, 16, 4096),
             Case(8192, 8192, 16, 4096),
             Case(4096, 4096, 8, 4096), Case(4096, 4096, 64, 4096),
             Case(4096, 4096, 16, 512), Case(4096, 4096, 16, 16384),
             Case(11008, 4096, 16, 4096), Case(4096, 11008, 16, 4096)]
SMOKE_GRID = [Case(256, 256, 8, 256), Case(320, 192, 8, 512)]


def parse_case(text: str) -> Case:
    """``MxN:R:TOKENS``, e.g. ``4096x4096:16:4096``."""
    try:
        shape, r, tokens = text.split(":")
        m, n = shape.lower().split("x")
        case = Case(int(m), int(n), int(r), int(tokens))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--case {text!r}: expected MxN:R:TOKENS, e.g. 4096x4096:16:4096")
    if min(case.m, case.n, case.r, case.tokens) < 1 or case.r > min(case.m, case.n):
        raise argparse.ArgumentTypeError(f"--case {text!r}: sizes must be positive and r <= min(m, n)")
    return case


def make_problem(case: Case, device: torch.device, step_ratio: float, seed: int):
    """The thin terms and coefficients of one OPLoRA step target (float32), from ``seed``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    m, n, r, t = case.m, case.n, case.r, case.tokens

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    spectrum = torch.logspace(0, -1, r).to(device)
    qb, _ = torch.linalg.qr(randn(m, r))
    qa, _ = torch.linalg.qr(randn(n, r))
    b0 = (qb * spectrum.sqrt()).contiguous()
    a0 = (spectrum.sqrt()[:, None] * qa.T).contiguous()
    x = randn(t, n) / torch.arange(1, n + 1, device=device).sqrt()
    scale = 2.0  # s = alpha / r
    sd_t = (scale * randn(t, m) / t ** 0.5).T  # s D^T, a transposed view as an optimizer has it
    um, vm = randn(m, r), randn(r, n)
    grad = sd_t @ x
    balance = (grad.norm() / (um @ vm).norm()).sqrt()  # momentum as large as the gradient
    um, vm = um * balance, vm * balance
    lr = float(step_ratio * (b0 @ a0).norm() / (grad + MOMENTUM * (um @ vm)).norm())
    terms = [(b0, a0), (sd_t, x), (um, vm)]
    coeffs = [1.0, -lr, -lr * MOMENTUM]
    return terms, coeffs


def form_target(terms, coeffs) -> torch.Tensor:
    """The explicit m x n target: what an SVD-based update must build first."""
    (b0, a0), (sd_t, x), (um, vm) = terms
    t = b0 @ a0
    t.addmm_(sd_t, x, alpha=coeffs[1])
    t.addmm_(um, vm, alpha=coeffs[2])
    return t


def balanced(u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vt[:r]


def svd_full(t: torch.Tensor, r: int):
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    return balanced(u, s, vh, r)


def svd_lowrank(t: torch.Tensor, r: int, oversample: int):
    q = min(r + oversample, *t.shape)
    u, s, v = torch.svd_lowrank(t, q=q, niter=2)
    return balanced(u, s, v.mT, r)


def accuracy(b: torch.Tensor, a: torch.Tensor, t64: torch.Tensor, opt: torch.Tensor, opt_resid: float) -> Tuple[float, float]:
    p = b.double() @ a.double()
    rel = float((p - opt).norm() / opt.norm())
    ratio = float((t64 - p).norm() / opt_resid) if opt_resid > 0 else float("nan")
    return rel, ratio


def run(cases: Sequence[Case], device: torch.device, *, repeats: int, warmup: int, step_ratio: float,
        prox: float, oversample: int, seed: int, progress: bool = True) -> List[Dict[str, object]]:
    """Time and score every provider on every case; one row per (case, provider)."""
    from tqdm.auto import tqdm

    providers = ["lorsum iters=0", "lorsum iters=1", "lorsum iters=2", "form T", "torch.linalg.svd",
                 "torch.svd_lowrank"]
    bar = tqdm(total=len(cases) * len(providers), desc="oplora-bench", unit="run", disable=not progress,
               file=sys.stderr)
    rows: List[Dict[str, object]] = []
    for case in cases:
        terms, coeffs = make_problem(case, device, step_ratio, seed)
        init = terms[0]
        t = form_target(terms, coeffs)
        t64 = t.double()
        u, s, vh = torch.linalg.svd(t64, full_matrices=False)
        opt = (u[:, :case.r] * s[:case.r]) @ vh[:case.r]
        opt_resid = float(s[case.r:].norm())
        del u, s, vh
        results: Dict[str, Tuple[object, Optional[Tuple[torch.Tensor, torch.Tensor]]]] = {}
        for name in providers:
            bar.set_postfix_str(f"{case.label}: {name}")
            if name.startswith("lorsum"):
                iters = int(name.split("=")[1])
                fn = lambda: oplora.lorsum(terms, coeffs, init, iters=iters, prox=prox)  # noqa: E731
            elif name == "form T":
                fn = lambda: form_target(terms, coeffs)  # noqa: E731
            elif name == "torch.linalg.svd":
                fn = lambda: svd_full(t, case.r)  # noqa: E731
            else:
                fn = lambda: svd_lowrank(t, case.r, oversample)  # noqa: E731
            timing = measure(fn, device, warmup=warmup, repeats=repeats)
            torch.manual_seed(seed)  # svd_lowrank is randomized: score a reproducible draw
            results[name] = (timing, None if name == "form T" else fn())
            bar.update()
        svd_time = results["torch.linalg.svd"][0].median
        form_time = results["form T"][0].median
        for name in providers:
            timing, factors = results[name]
            row: Dict[str, object] = {"provider": name, "m": case.m, "n": case.n, "r": case.r,
                                      "tokens": case.tokens, "dtype": "float32", "prox": prox,
                                      "step_ratio": step_ratio, "repeats": len(timing.samples),
                                      "time_median_s": timing.median, "time_min_s": timing.low,
                                      "time_max_s": timing.high}
            is_svd = name.startswith("torch.")
            row["form_time_s"] = form_time if is_svd else ""
            if factors is not None:
                row["rel_err"], row["objective_ratio"] = accuracy(*factors, t64, opt, opt_resid)
            else:
                row["rel_err"] = row["objective_ratio"] = ""
            row["speedup_vs_svd"] = svd_time / timing.median
            row["speedup_vs_form_svd"] = (form_time + svd_time) / (timing.median + (form_time if is_svd else 0.0))
            rows.append(row)
        del t, t64, opt, terms, results
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows


def table(rows: Sequence[Dict[str, object]], markdown: bool = False) -> str:
    header = ["case", "provider", "median ms", "min-max ms", "rel err", "obj ratio", "x vs SVD"]
    body = []
    for row in rows:
        case = row_label(row)
        rel = "" if row["rel_err"] == "" else f"{row['rel_err']:.1e}"
        ratio = "" if row["objective_ratio"] == "" else f"{row['objective_ratio']:.6f}"
        speed = "" if row["provider"] == "form T" else f"{row['speedup_vs_svd']:.1f}"
        body.append([case, row["provider"], f"{1e3 * row['time_median_s']:.3f}",
                     f"{1e3 * row['time_min_s']:.3f}-{1e3 * row['time_max_s']:.3f}", rel, ratio, speed])
    return format_table(header, body, markdown=markdown)


def plot(rows: Sequence[Dict[str, object]], path: str, title: str) -> None:
    """Log-log time vs layer size per provider (square layers at the most common r and tokens),
    with LoRSum's speedup over the full SVD annotated, and the accuracy of every provider."""
    import matplotlib.pyplot as plt

    # Left panel: square layers if the grid has any (else every case, at size sqrt(m n)), at the
    # most common (r, tokens), so that one line per provider shows scaling with size.
    square = [r for r in rows if r["m"] == r["n"]] or list(rows)
    key = max({(r["r"], r["tokens"]) for r in square}, key=lambda k: sum((x["r"], x["tokens"]) == k for x in square))
    square = [{**r, "size": (r["m"] * r["n"]) ** 0.5} for r in square if (r["r"], r["tokens"]) == key]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for name in providers:
        pts = sorted((r["size"], r["time_median_s"], r["time_min_s"], r["time_max_s"]) for r in square if r["provider"] == name)
        if not pts:
            continue
        xs, ys, lo, hi = zip(*pts)
        ax1.errorbar(xs, ys, yerr=[[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]],
                     marker="o", capsize=3, label=name, linestyle="--" if name == "form T" else "-")
        if name == "lorsum iters=1":
            for r in square:
                if r["provider"] == name:
                    ax1.annotate(f"{r['speedup_vs_svd']:.0f}x faster than SVD", (r["size"], r["time_median_s"]),
                                 textcoords="offset points", xytext=(6, -14), fontsize=8)
    ax1.set_xscale("log", base=2)
    sizes = [r["size"] for r in square]
    ax1.set_xlim(min(sizes) / 1.3, max(sizes) * 2.2)  # room for the annotations
    ax1.set_yscale("log")
    ax1.set_xlabel(f"layer size sqrt(m n) (r = {key[0]}, tokens = {key[1]})")
    ax1.set_ylabel("median time per call [s]")
    ax1.set_title("time vs layer size")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)

    cases = list(dict.fromkeys(row_label(r, "\n") for r in rows))
    for i, name in enumerate(p for p in providers if p != "form T"):
        pts = [(cases.index(row_label(r, "\n")), max(r["rel_err"], 1e-12))
               for r in rows if r["provider"] == name]
        xs, ys = zip(*pts)
        ax2.scatter([x + 0.08 * (i - 2) for x in xs], ys, label=name, s=22)
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(cases)))
    ax2.set_xticklabels(cases, fontsize=7)
    ax2.set_ylabel("||BA - P*||_F / ||P*||_F  (P* = truncated SVD, float64)")
    ax2.set_title("accuracy against the rank-r optimum")
    ax2.grid(True, axis="y", which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    save_figure(fig, path, title)


def build_parser() -> argparse.ArgumentParser:
    p = suite_parser("lorsum", __doc__, prog="oplora-bench")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--smoke", action="store_true", help="tiny grid, 2 repeats: finishes in well under a minute")
    p.add_argument("--case", action="append", type=parse_case, metavar="MxN:R:TOKENS",
                   help="run these cases instead of the default grid (repeatable)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per provider (default 5, smoke 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--step-ratio", type=float, default=0.05, help="||lr * step||_F / ||B0 A0||_F (default 0.05)")
    p.add_argument("--prox", type=float, default=0.0, help="LoRSum proximal weight (default 0)")
    p.add_argument("--oversample", type=int, default=8, help="svd_lowrank q = r + oversample (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``oplora-bench``); returns the exit status 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = choose_device(args, "lorsum")
    cases = args.case or (SMOKE_GRID if args.smoke else (CUDA_GRID if device.type == "cuda" else CPU_GRID))
    repeats = args.repeats or (2 if args.smoke else 5)
    info = machine_info(device)
    command = " ".join(["oplora-bench", *argv])
    print(f"oplora-bench lorsum on {info['device_name']} ({device.type}, {info['cpu_threads']} CPU threads), "
          f"torch {info['torch']}, triton {info['triton']}; {len(cases)} cases x 6 providers, {repeats} repeats",
          flush=True)
    print(f"backend: {oplora.backend_info()['selected'][device.type]}", flush=True)
    rows = run(cases, device, repeats=repeats, warmup=args.warmup, step_ratio=args.step_ratio, prox=args.prox,
               oversample=args.oversample, seed=args.seed, progress=not args.quiet)
    rows = [{**info, "command": command, **row} for row in rows]
    print(table(rows))

    stem = os.path.join(args.out, f"lorsum_{device.type}{'_smoke' if args.smoke else ''}")
    markdown = markdown_header(
        f"LoRSum vs SVD ({device.type})", command, info, machine=f", {info['cpu_threads']} CPU threads",
        notes=[f"step: ||lr step|| = {args.step_ratio} ||B0 A0||, momentum {MOMENTUM}, prox {args.prox}; times "
               f"are medians of >= {repeats} calls (>= 3 where they add up past 15 s; the CSV has the count) after "
               f"{args.warmup} warm-up; SVD times exclude forming T (the `form T` row)"])
    markdown += table(rows, markdown=True) + "\n"
    title = (f"LoRSum vs SVD on {info['device_name']} ({info['cpu_threads']} threads), "
             f"torch {info['torch']}, {info['date']}")
    write_results(stem, rows, markdown, None if args.no_plot else lambda path: plot(rows, path, title))
    return 0
