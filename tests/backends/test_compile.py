"""Ahead-of-time compilation of the Triton row pass for sm_80 and sm_90, on a machine without a GPU.

Every specialization the GPU benchmarks launch (``oplora.bench._aot``: derived from the launcher,
with its unaligned twins) is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` and assembled by Triton's bundled ``ptxas -v``. The tests
fail on any compile error, on spills beyond ``SPILL_BUDGET``, and when the committed table
``bench/results/row_pass_ptxas.csv`` differs from what was measured (regenerate it with
``python -m oplora.bench._aot --write``). The compilation runs in a subprocess with
``TRITON_INTERPRET=0`` (this process interprets the kernels), two compile processes.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from oplora.bench import _aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "ptxas.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "oplora.bench._aot", "--json", str(out), "--jobs", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"python -m oplora.bench._aot wrote no results:\n{proc.stdout}\n{proc.stderr}"
    with open(out) as f:
        return json.load(f)


def _name(r):
    return (f"{r['x_dtype']} qd={r['has_qd']} qx={r['has_qx']} stats={r['stats']} aligned={r['aligned']} "
            f"K {r['block_kd']}/{r['block_kx']} sm_{r['arch']}")


def test_every_specialization_compiles_for_sm80_and_sm90(compiled):
    failed = [f"{_name(r)}:\n{r['error']}" for r in compiled["results"] if not r["ok"]]
    assert not failed, "compile errors:\n" + "\n".join(failed)


def test_specializations_cover_what_the_benchmarks_launch(compiled):
    rows = compiled["results"]
    assert {r["arch"] for r in rows} == set(_aot.ARCHS) == {80, 90}
    assert {r["x_dtype"] for r in rows} == {"bf16", "fp16", "fp32"}
    assert {r["aligned"] for r in rows} == {True, False}
    assert {r["stats"] for r in rows} == {True, False}  # the K-FAC variant and the plain one
    products = {(r["has_qd"], r["has_qx"]) for r in rows}
    assert {(True, False), (False, True), (True, True)} <= products  # qd only, qx only, both
    assert {r["block_kd"] for r in rows} >= {16, 32}  # smoke rank 4 (K 8) and full rank 16 (K 32)
    sources = {label for r in rows for label in r["launched_by"]}
    for needed in ("7B oplora step", "7B scaled step", "7B row pass", "smoke oplora step"):
        assert needed in sources
    # every specialization is compiled for both archs
    keys = {}
    for r in rows:
        keys.setdefault(tuple(r[k] for k in _aot.KEY if k != "arch"), set()).add(r["arch"])
    assert all(archs == {80, 90} for archs in keys.values())


def test_no_spills_beyond_budget(compiled):
    over = [f"{_name(r)}: {r['spill_stores']} B stores, {r['spill_loads']} B loads, {r['registers']} registers"
            for r in compiled["results"] if r["ok"] and r["spill_stores"] + r["spill_loads"] > _aot.SPILL_BUDGET]
    assert not over, f"spills beyond {_aot.SPILL_BUDGET} bytes:\n" + "\n".join(over)


def test_committed_table_matches_measurement(compiled):
    path = os.path.join(ROOT, _aot.TABLE + ".csv")
    with open(path) as f:
        committed = list(csv.DictReader(f))
    assert committed, f"{path} is empty"
    if committed[0]["triton"] != compiled["versions"]["triton"]:
        pytest.skip(f"{path} was measured with triton {committed[0]['triton']}, this is "
                    f"{compiled['versions']['triton']}: regenerate it with {_aot.COMMAND}")
    measured = [{k: str(v) for k, v in row.items()} for row in _aot.csv_rows(compiled["results"])]
    strip = [{k: v for k, v in row.items() if k not in ("triton", "ptxas")} for row in committed]
    assert strip == measured, f"{path} is out of date: regenerate it with {_aot.COMMAND}"
    with open(os.path.join(ROOT, _aot.TABLE + ".md")) as f:
        md = f.read()
    assert _aot.COMMAND in md and f"triton {compiled['versions']['triton']}" in md
