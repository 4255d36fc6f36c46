#!/usr/bin/env bash
# One short GPU check: install, the CUDA-marked tests on the compiled kernels, the GPU suites.
#
#   bash bench/gpu_check.sh [OUT_DIR] [--skip-install] [--skip-tests]
#   bash bench/gpu_check.sh --dry-run        # on any machine (CPU): checks and prints the plan
#
# For a CUDA machine with the GPU image (python3 with torch 2.11, triton 3.6, cmake, ninja,
# pybind11; no internet), from a fresh copy of the tree. Steps, each under `timeout` with its
# budget in seconds (caps, not estimates; the estimates for an H100/H200 are in brackets):
#   install   (300) `pip install --no-build-isolation --no-deps -e .`, OPLORA_REQUIRE_EXT=1 [~60 s]
#   tests     (240) the CUDA-marked tests, TRITON_INTERPRET=0 (compiled kernels) [~90 s]
#   suites, 480 s together (each capped by its budget and by what is left of the 480):
#   kernels   (240) fused row pass / 7B-shaped stack vs bandwidth floor and forward+backward,
#                   LoRSum vs full SVD and svd_lowrank at 4096^2 r16 [~120 s]
#   memory    ( 90) OPLoRA / ScaledOPLoRA / AdamW peak memory at the CUDA size [~30 s]
#   model     (120) the whole-model-step suite, only if `oplora-bench --suite model --help` works
#   blocks64  ( 90) optional: the model scope's row pass at BLOCK_T 64 x BLOCK_C 32, the launch that
#                   spills no register (bench/results/row_pass_ptxas.md) vs the default 128 x 64 [~45 s]
#   lorsum8k  (120) optional: LoRSum vs SVD at 8192^2 r16 [~90 s]
# An optional step runs only if its whole budget is left of the 480 s; its failure or timeout is
# reported but does not fail the check.
# Output in OUT_DIR (default bench/results/gpu_<UTC date-time>): each suite's CSV, markdown and
# PNG, one log per step (NN_name.log), and summary.md (device, driver, torch, triton, each
# command with its status and time, the targets the kernels suite reports). A failed step does
# not stop the check; the exit status is non-zero when any required step failed.
#
# --dry-run (no GPU needed): checks that oplora, its bench suites and triton import, that every
# planned suite command's arguments parse (the suite's own argparse), that the CUDA-marked tests
# collect; prints the plan; exits non-zero when anything is off. tests/bench/test_gpu_check.py runs it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
SUITE_BUDGET=480
DRY_RUN=0
SKIP_INSTALL=0
SKIP_TESTS=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/!p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) if [[ -n "$OUT" ]]; then echo "gpu_check.sh: one output folder, got $OUT and $arg" >&2; exit 2; fi
       OUT="$arg" ;;
  esac
done
OUT="${OUT:-bench/results/gpu_$(date -u +%Y%m%d_%H%M)}"
export OPLORA_REQUIRE_EXT=1 PYTHONUNBUFFERED=1

# The CUDA-marked test files, found rather than listed.
mapfile -t CUDA_TESTS < <(grep -rl --include="test_*.py" "pytest.mark.cuda" tests | sort)

# name|budget s|required (1) or optional (0)|command (run by bash -c with $PY and $OUT exported)
STEPS=(
  "install|300|1|\$PY -m pip install --no-build-isolation --no-deps -e . && \$PY -c 'import json, oplora; print(json.dumps(oplora.backend_info(), indent=1))'"
  "tests|240|1|TRITON_INTERPRET=0 \$PY -m pytest -q -p no:cacheprovider -m cuda --junitxml=\$OUT/tests.xml ${CUDA_TESTS[*]}"
  "kernels|240|1|\$PY -m oplora.bench --suite kernels --device cuda --out \$OUT"
  "memory|90|1|\$PY -m oplora.bench --suite memory --device cuda --out \$OUT"
  "model|120|1|\$PY -m oplora.bench --suite model MODEL_DEVICE--out \$OUT"
  "blocks64|90|0|\$PY -m oplora.bench --suite kernels --device cuda --scopes model --no-lorsum --block-t 64 --block-c 32 --out \$OUT/blocks_64x32"
  "lorsum8k|120|0|\$PY -m oplora.bench --suite lorsum --device cuda --case 8192x8192:16:4096 --repeats 3 --out \$OUT/lorsum_8192 --quiet"
)
SUITES=(kernels memory model blocks64 lorsum8k)

is_suite() { local s; for s in "${SUITES[@]}"; do [[ "$s" == "$1" ]] && return 0; done; return 1; }
field() { local IFS='|'; read -r -a F <<<"$1"; echo "${F[$2]}"; }

# The model suite exists once the whole-model-step issue lands: it runs only if it answers --help
# (asked when the plan is made, and again after the install), with --device cuda if it has that.
HAVE_MODEL=0
probe_model() {
  local help
  HAVE_MODEL=0
  if help="$("$PYTHON" -m oplora.bench --suite model --help 2>/dev/null)"; then
    HAVE_MODEL=1
    [[ "$help" == *--device* ]] && MODEL_DEVICE="--device cuda " || MODEL_DEVICE=""
  fi
}
MODEL_DEVICE=""
probe_model
# A step's command as it runs (the placeholders filled in).
show() { local c="${1//MODEL_DEVICE/$MODEL_DEVICE}"; c="${c//\$PY/$PYTHON}"; echo "${c//\$OUT/$OUT}"; }

plan() {
  local i=0 step name budget req cmd
  echo "gpu_check plan (output: $OUT; suites: ${SUITE_BUDGET} s together)"
  for step in "${STEPS[@]}"; do
    name="$(field "$step" 0)"; budget="$(field "$step" 1)"; req="$(field "$step" 2)"; cmd="$(field "$step" 3)"
    i=$((i + 1))
    local note=""
    [[ "$req" == 0 ]] && note=" (optional)"
    if [[ "$name" == model && "$HAVE_MODEL" == 0 ]]; then note=" (skipped: no --suite model yet)"; fi
    if [[ "$name" == install && "$SKIP_INSTALL" == 1 ]] || [[ "$name" == tests && "$SKIP_TESTS" == 1 ]]; then
      note=" (skipped by option)"
    fi
    printf '  %d. %-9s budget %4ss%s: %s\n' "$i" "$name" "$budget" "$note" "$(show "$cmd")"
  done
}

# ---------------------------------------------------------------------------------------------
if [[ "$DRY_RUN" == 1 ]]; then
  status=0
  plan
  echo "dry run: checking imports"
  if ! "$PYTHON" -c "import oplora, oplora.bench, oplora.bench.kernels, oplora.bench.lorsum, oplora.bench.memory, triton, oplora_kernels.row_pass; print('  imports ok: oplora', oplora.__file__, '| triton', triton.__version__)"; then
    echo "  FAILED: imports" >&2; status=1
  fi
  command -v timeout >/dev/null || { echo "  FAILED: no 'timeout' command" >&2; status=1; }
  echo "dry run: checking each suite command's arguments"
  for step in "${STEPS[@]}"; do
    name="$(field "$step" 0)"; cmd="$(field "$step" 3)"
    is_suite "$name" || continue
    [[ "$name" == model && "$HAVE_MODEL" == 0 ]] && continue
    args="$(show "$cmd")"
    args="${args#*-m oplora.bench }"
    # shellcheck disable=SC2086
    if ! "$PYTHON" - $args <<'EOF'
import importlib, sys
from oplora.bench import SUITES
argv = sys.argv[1:]
suite = argv[argv.index("--suite") + 1]
module = importlib.import_module(SUITES[suite])
if not hasattr(module, "build_parser"):
    raise SystemExit(f"suite {suite}: no build_parser() to check its arguments with")
module.build_parser().parse_args(argv)  # exits 2 with the reason on a bad argument
print(f"  {suite}: arguments parse: {' '.join(argv)}")
EOF
    then echo "  FAILED: $name arguments" >&2; status=1; fi
  done
  echo "dry run: collecting the CUDA-marked tests"
  if [[ "${#CUDA_TESTS[@]}" -eq 0 ]]; then echo "  FAILED: no CUDA-marked test file" >&2; status=1
  elif collected="$(TRITON_INTERPRET=0 "$PYTHON" -m pytest -q --collect-only -m cuda "${CUDA_TESTS[@]}" 2>&1)"; then
    echo "  $(tail -n 1 <<<"$collected") in ${CUDA_TESTS[*]}"
  else
    echo "$collected" | tail -n 20 >&2; echo "  FAILED: collecting the CUDA tests" >&2; status=1
  fi
  if [[ "$status" == 0 ]]; then echo "dry run: ok"; else echo "dry run: FAILED" >&2; fi
  exit "$status"
fi

# ---------------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: no nvidia-smi: run it on a CUDA machine (or --dry-run)" >&2; exit 2; }
mkdir -p "$OUT"
PY="$PYTHON"
export PY OUT TRITON_INTERPRET=0  # compiled kernels everywhere
SUMMARY="$OUT/summary.md"
GPU="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n 1)"
{
  echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "- device (nvidia-smi name, driver, memory): $GPU"
  echo "- python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
  echo "- torch $("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), triton $("$PYTHON" -c 'import triton; print(triton.__version__)' 2>&1)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "- environment: OPLORA_REQUIRE_EXT=1; suites get ${SUITE_BUDGET} s together"
  echo
  echo "| # | step | command | budget s | time s | status |"
  echo "|---|---|---|---|---|---|"
} >"$SUMMARY"
plan | tee "$OUT/plan.txt"

failed=0
suite_used=0
i=0
for step in "${STEPS[@]}"; do
  name="$(field "$step" 0)"; budget="$(field "$step" 1)"; req="$(field "$step" 2)"; cmd="$(field "$step" 3)"
  i=$((i + 1))
  [[ "$name" == model ]] && probe_model  # after the install
  shown="$(show "$cmd")"
  cmd="${cmd//MODEL_DEVICE/$MODEL_DEVICE}"
  skip=""
  if [[ "$name" == install && "$SKIP_INSTALL" == 1 ]] || [[ "$name" == tests && "$SKIP_TESTS" == 1 ]]; then
    skip="skipped by option"
  elif [[ "$name" == model && "$HAVE_MODEL" == 0 ]]; then
    skip="skipped: no --suite model"
  elif is_suite "$name"; then
    left=$((SUITE_BUDGET - suite_used))
    if [[ "$req" == 0 && "$left" -lt "$budget" ]]; then skip="skipped: ${left} s of the suites' budget left"
    elif [[ "$left" -le 0 ]]; then skip="not run: the suites' ${SUITE_BUDGET} s are spent"
    elif [[ "$left" -lt "$budget" ]]; then budget="$left"; fi
  fi
  if [[ -n "$skip" ]]; then
    echo "== $i. $name: $skip"
    echo "| $i | $name | \`$shown\` | $budget | - | $skip |" >>"$SUMMARY"
    [[ "$skip" == "not run:"* && "$req" == 1 ]] && failed=1
    continue
  fi
  log="$OUT/$(printf '%02d' "$i")_$name.log"
  echo "== $i. $name (budget ${budget} s): $shown"
  t0=$(date +%s)
  set +e
  timeout --signal=TERM --kill-after=15 "$budget" bash -c "$cmd" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  took=$(( $(date +%s) - t0 ))
  if is_suite "$name"; then suite_used=$((suite_used + took)); fi
  if [[ "$rc" == 0 ]]; then state="ok"
  elif [[ "$rc" == 124 || "$rc" == 137 ]]; then state="TIMEOUT after ${budget} s"
  else state="FAILED (exit $rc)"; fi
  [[ "$rc" != 0 && "$req" == 0 ]] && state="$state, optional"
  [[ "$rc" != 0 && "$req" == 1 ]] && failed=1
  echo "== $i. $name: $state in ${took} s"
  echo "| $i | $name | \`$shown\` | $budget | $took | $state |" >>"$SUMMARY"
done

{
  echo
  echo "## Targets (from the kernels suite)"
  echo
  if [[ -f "$OUT/kernels_cuda.md" ]]; then
    sed -n '/^## SPEC section 4 ratios/,/^## Kernels/p' "$OUT/kernels_cuda.md" | grep '^- ' || echo "- (none found)"
  else
    echo "- kernels_cuda.md missing: the kernels suite did not finish"
  fi
  echo
  echo "Files: $(cd "$OUT" && ls | tr '\n' ' ')"
} >>"$SUMMARY"
cat "$SUMMARY"
if [[ "$failed" != 0 ]]; then echo "gpu_check: FAILED (see $SUMMARY)" >&2; exit 1; fi
echo "gpu_check: all required steps passed ($SUMMARY)"
