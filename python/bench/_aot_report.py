"""The committed table of the ahead-of-time Triton compile (``python -m oplora.bench._aot``): its
columns and budget, the CSV rows and the markdown report of ``bench/results/row_pass_ptxas``."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Dict, List, Sequence

#: Spill stores + loads (bytes) a specialization may have (tests/backends/test_compile.py). Not 0: with the
#: launcher's defaults (BLOCK_T 128 x BLOCK_C 64, 8 warps, 2 stages) the tf32x3 products hold
#: most tiles at 255 registers and some spill, up to 3096 B (float32 qd+qx, unaligned, sm_90),
#: 548 B on the 7B bf16 ScaledOPLoRA path (qd+qx, sm_90); at BLOCK_T 64 x BLOCK_C 32 none
#: spills (the table's what-if line). Set it to 0 once a GPU run has chosen the blocks.
SPILL_BUDGET = 4096
#: Launch options tabulated as what-ifs by ``--write`` (a summary line each, not in the CSV).
WHAT_IF = ({"block_t": 64, "block_c": 32},)
#: Committed table (``--write``), relative to the repository root.
TABLE = os.path.join("bench", "results", "row_pass_ptxas")
COMMAND = "python -m oplora.bench._aot --write"
#: Columns that identify a specialization, then what ptxas and Triton report.
KEY = ("kernel", "x_dtype", "g_dtype", "has_qd", "has_qx", "stats", "aligned", "block_t", "block_c", "block_kd",
       "block_kx", "precision", "num_warps", "num_stages", "arch")
MEASURED = ("registers", "spill_stores", "spill_loads", "stack_frame", "shared_bytes")



def versions() -> Dict[str, str]:
    import torch
    import triton
    from triton import knobs

    return {"triton": triton.__version__, "ptxas": str(knobs.nvidia.ptxas.version), "torch": torch.__version__}


def csv_rows(results: Sequence[Dict]) -> List[Dict[str, object]]:
    """The committed CSV's rows: key columns, measured columns, launched_by ("; "-joined)."""
    return [{**{k: r[k] for k in KEY}, **{k: r[k] for k in MEASURED}, "launched_by": "; ".join(r["launched_by"])}
            for r in results]


def _products(r: Dict) -> str:
    return "+".join([p for p, on in (("qd", r["has_qd"]), ("qx", r["has_qx"])) if on]) or "none"


def what_if_line(overrides: Dict[str, int], results: Sequence[Dict]) -> str:
    """One line: how the specializations fare with ``overrides`` (compile errors, spills, registers)."""
    ok = [r for r in results if r["ok"]]
    spilling = [r for r in ok if r["spill_stores"] + r["spill_loads"] > 0]
    worst = max((r["spill_stores"] + r["spill_loads"] for r in spilling), default=0)
    text = ", ".join(f"{k} {v}" for k, v in overrides.items())
    return (f"{text} (other options the launcher's): {len(results) - len(ok)} compile errors, {len(spilling)} of "
            f"{len(results)} specializations spill (worst {worst} B), registers "
            f"{min(r['registers'] for r in ok)}-{max(r['registers'] for r in ok)}, shared memory up to "
            f"{max(r['shared_bytes'] for r in ok)} B")


def _sources(labels: Sequence[str]) -> str:
    twin = " (unaligned twin)"
    if labels and all(label.endswith(twin) for label in labels):
        return "unaligned twin of: " + "; ".join(label[:-len(twin)] for label in labels)
    return "; ".join(labels)


def markdown(results: Sequence[Dict], info: Dict[str, str], what_if: Sequence[str] = ()) -> str:
    from ._common import format_table

    header = ["rows X/G", "products", "stats", "aligned", "K pad (qd/qx)", "arch", "regs", "spill st/ld B",
              "stack B", "smem B", "launched by"]
    body = [[f"{r['x_dtype']}/{r['g_dtype']}", _products(r), "yes" if r["stats"] else "no",
             "yes" if r["aligned"] else "no", f"{r['block_kd']}/{r['block_kx']}", f"sm_{r['arch']}",
             str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["stack_frame"]),
             str(r["shared_bytes"]), _sources(r["launched_by"])] for r in results]
    launch = {(r["block_t"], r["block_c"], r["precision"], r["num_warps"], r["num_stages"]) for r in results}
    launch_text = "; ".join(f"BLOCK_T {t} x BLOCK_C {c}, tl.dot {p}, {w} warps, {s} stages"
                            for t, c, p, w, s in sorted(launch))
    def spill(r):
        return r["spill_stores"] + r["spill_loads"]

    spilling = sorted((r for r in results if spill(r) > 0), key=spill, reverse=True)
    over = [r for r in spilling if spill(r) > SPILL_BUDGET]
    worst = (f" (worst {spill(spilling[0])} B: {spilling[0]['x_dtype']} {_products(spilling[0])}"
             f"{' +stats' if spilling[0]['stats'] else ''}, {'' if spilling[0]['aligned'] else 'un'}aligned, "
             f"sm_{spilling[0]['arch']})") if spilling else ""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return (
        "# Row pass kernel: registers, spills and shared memory per specialization (ptxas -v)\n\n"
        f"- command: `{COMMAND}` (check without writing: `python -m oplora.bench._aot`; "
        "the test `tests/backends/test_compile.py` compares this table with what it measures)\n"
        f"- triton {info['triton']} (its bundled ptxas {info['ptxas']}), torch {info['torch']}; "
        f"date {date}; {len(results)} compilations on a CPU-only machine, no GPU\n"
        "- what: every specialization of `oplora_kernels.row_pass._row_pass_kernel` the kernels suite "
        "launches (its 7B-shaped and smoke workloads in bf16, fp16 and fp32, through the step engine and "
        "the bare row pass, recorded from `plan_launches`/`_launch`) and the unaligned twin of each, "
        "compiled with `triton.compile(ASTSource(...), target=GPUTarget(\"cuda\", arch, 32))` for sm_80 "
        "and sm_90 (sm_90a, as Triton assembles it)\n"
        f"- launch options: {launch_text}\n"
        "- regs: registers per thread; spill st/ld: spill stores/loads in bytes; stack: stack frame in "
        "bytes (all from `ptxas -v` on the PTX, Triton's flags); smem: Triton's shared-memory "
        "allocation (dynamic, which ptxas does not count)\n"
        f"- spills: {len(spilling)} of {len(results)} specializations spill{worst}; budget {SPILL_BUDGET} B of "
        f"spill stores + loads per specialization (`SPILL_BUDGET`, tests/backends/test_compile.py), over it: {len(over)}"
        + "\n" + "".join(f"- what-if: {line}\n" for line in what_if)
        + "\n" + format_table(header, body, markdown=True) + "\n")


def write_table(results: Sequence[Dict], stem: str, what_if: Sequence[str] = ()) -> List[str]:
    from ._common import write_csv

    info = versions()
    rows = [{**row, "triton": info["triton"], "ptxas": info["ptxas"]} for row in csv_rows(results)]
    write_csv(stem + ".csv", rows)
    with open(stem + ".md", "w") as f:
        f.write(markdown(results, info, what_if))
    return [stem + ".csv", stem + ".md"]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
