"""``bench/gpu_check.sh --dry-run`` on the CPU: the GPU check's imports, every planned suite
command's arguments and the CUDA-marked tests' collection are checked, and the plan fits the
time it promises (suites at most 480 s together)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the GPU check is a bash script using timeout")


def run(*args, **env):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def dry_run():
    return run("--dry-run", "/tmp/oplora_gpu_check_plan")


def test_dry_run_passes_and_prints_the_plan(dry_run):
    assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
    out = dry_run.stdout
    assert "dry run: ok" in out and "imports ok" in out
    plan = dict(re.findall(r"^\s+\d+\. (\S+)\s+budget\s+(\d+)s", out, flags=re.M))
    assert {"install", "tests", "kernels", "memory", "model", "blocks64", "lorsum8k"} == set(plan)
    assert "pip install --no-build-isolation" in out and "--suite kernels --device cuda" in out
    assert "TRITON_INTERPRET=0" in out and "-m cuda" in out
    assert "--out /tmp/oplora_gpu_check_plan" in out  # the output folder reaches every suite
    for suite in ("kernels", "memory", "lorsum"):
        assert f"  {suite}: arguments parse" in out
    assert re.search(r"\d+ tests? collected", out)  # the CUDA-marked tests import and collect


def test_required_suites_fit_the_promised_time(dry_run):
    out = dry_run.stdout
    total = int(re.search(r"suites: (\d+) s together", out).group(1))
    assert total <= 480
    budgets = {name: int(b) for name, b, note in
               re.findall(r"^\s+\d+\. (\S+)\s+budget\s+(\d+)s([^:]*):", dry_run.stdout, flags=re.M)
               if "optional" not in note}
    assert budgets["kernels"] + budgets["memory"] + budgets["model"] <= total


def test_bad_arguments_fail():
    proc = run("--dry-run", "--nonsense")
    assert proc.returncode == 2 and "unknown option" in proc.stderr
    proc = run("--dry-run", PYTHON=os.path.join(ROOT, "no-such-python"))
    assert proc.returncode != 0 and "FAILED" in proc.stdout + proc.stderr
