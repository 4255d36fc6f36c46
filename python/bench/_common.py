"""Shared benchmark plumbing: machine description, timing, CSV and markdown output."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Dict, List, Optional, Sequence
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, object]:
    """Where and with what a benchmark ran: one dict that goes into every CSV row."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "high" = TF32 on CUDA
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "oplora": _version("oplora"),
    }


@dataclass
class Timing:
    """Wall-clock samples of one provider on one case, in seconds."""

    samples: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def low(self) -> float:
        return min(self.samples)

    @property
    def high(self) -> float:
        return max(self.samples)


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so that a clock read after it counts the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
            min_total: float = 0.2, max_repeats: int = 100, max_total: float = 15.0) -> Timing:
    """Median-ready timing: ``warmup`` untimed calls, then ``repeats`` timed ones; more (up to
    ``max_repeats``) while the timed total is under ``min_total`` seconds, so that fast providers
    get enough samples; fewer (but at least 3) once it passes ``max_total``, so that a full SVD of
    a huge matrix does not dominate the run. CUDA work is synchronised around every call."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples: List[float] = []
    while len(samples) < repeats or (sum(samples) < min_total and len(samples) < max_repeats):
        if len(samples) >= min(3, repeats) and sum(samples) > max_total:
            break
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return Timing(samples)


class _OpCounter(TorchDispatchMode):
    """Counts the tensor ops that do work: views and metadata-only ops are free."""

    FREE = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "as_strided", "expand", "alias",
            "unsqueeze", "squeeze", "permute", "detach", "unbind", "split", "split_with_sizes", "narrow",
            "diagonal", "_reshape_alias", "lift_fresh", "set_"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.FREE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> Dict[str, int]:
    """One call of ``fn``, counting what it launches: ``tensor_ops`` (torch ops that do work --
    on a GPU each is a kernel launch or a copy, a few only allocate) and ``triton_launches``
    (launches of the fused row-pass kernel, ``oplora_kernels.row_pass``). The launch overhead of
    a step is proportional to their sum, whatever the device."""
    try:
        from oplora_kernels import row_pass as triton_row_pass
    except ImportError:  # no Triton: nothing of it can launch
        triton_row_pass = None
    patch = (contextlib.nullcontext() if triton_row_pass is None
             else mock.patch.object(triton_row_pass, "_launch", wraps=triton_row_pass._launch))
    with patch as launches, _OpCounter() as ops:
        fn()
    return {"tensor_ops": ops.count, "triton_launches": 0 if launches is None else launches.call_count}


def write_csv(path: str, rows: Sequence[Dict[str, object]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields: List[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A fixed-width text table, or a GitHub markdown table."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def write_results(stem: str, rows: Sequence[Dict[str, object]], markdown: str,
                  plot: Optional[Callable[[str], None]] = None, *, quiet: bool = False) -> List[str]:
    """Write a suite's results: ``stem.csv`` (``rows``), ``stem.md`` (``markdown``) and, when
    ``plot`` is given, ``stem.png`` through ``plot(path)``. Without matplotlib the plot is skipped
    with a message (the CSV and markdown are written all the same). Returns the paths written and
    prints them unless ``quiet``."""
    write_csv(stem + ".csv", rows)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    written = [stem + ".csv", stem + ".md"]
    if plot is not None:
        try:
            import matplotlib
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install 'oplora[bench]')", flush=True)
        else:
            matplotlib.use("Agg")
            plot(stem + ".png")
            written.append(stem + ".png")
    if not quiet:
        print("wrote " + ", ".join(written), flush=True)
    return written


def save_figure(fig, path: str, title: str) -> None:
    """Title, tighten, save (110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def choose_device(args, suite: str) -> torch.device:
    """The device ``--device`` asks for (default: cuda when torch sees a GPU, else cpu; SystemExit
    for cuda without one), with ``--threads`` applied when the suite has that option."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"oplora-bench --suite {suite}: --device cuda but torch sees no CUDA GPU")
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def suite_parser(suite: str, doc: str, prog: str = "") -> argparse.ArgumentParser:
    """The argument parser of the suite ``suite`` (``doc``: its module docstring), with the
    options every suite shares: ``--suite``, ``--out``, ``--no-plot``."""
    p = argparse.ArgumentParser(prog=prog or f"oplora-bench --suite {suite}", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=suite, help=f"the suite (this one: {suite}; oplora-bench --help lists them)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="output folder (default bench/results)")
    p.add_argument("--no-plot", action="store_true",
                   help="skip the PNG (skipped anyway, with a message, without matplotlib)")
    return p


def markdown_header(title: str, command: str, info: Dict[str, object], *, machine: str = "",
                    notes: Sequence[str] = ()) -> str:
    """The head of a suite's markdown results: title, the command, the machine (``machine`` is
    appended to its name), the versions, the date, then ``notes`` as bullets."""
    lines = [f"# {title}", "", f"- command: `{command}`", f"- machine: {info['device_name']}{machine}",
             f"- torch {info['torch']}, triton {info['triton']}, Python {info['python']}, oplora {info['oplora']}, "
             f"float32 matmul precision {info['float32_matmul_precision']}", f"- date: {info['date']}"]
    return "\n".join(lines + [f"- {note}" for note in notes]) + "\n\n"
