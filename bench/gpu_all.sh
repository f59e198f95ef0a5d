#!/usr/bin/env bash
# The ONE script a GPU session runs: CUDA tests, kernel checks + timings, model checks + timings.
#
# 1. Here, once, on a machine with network (the device machine has none, and its image lacks
#    diffusers and importlib_metadata):
#        bash bench/gpu_all.sh --prepare          # pure-Python wheels into .whl/ (git-ignored)
# 2. Through the device tool, as one call (about 6-9 minutes plus the machine's start):
#        run(command="bash bench/gpu_all.sh", carry=[".whl"], timeout_s=600)
#    Without .whl the run still goes on: the diffusers baselines are then recorded as missing.
#
# On the device machine python3 is the image's (PyTorch, Triton, CUDA preinstalled; no network),
# so nothing is pip-installed from an index: `pip install -e .[dev]` would try to fetch PyAV
# and fail. The repository runs from its checkout via PYTHONPATH, the carried wheels go to
# /tmp/site. Steps, each under its own `timeout`, all inside GPU_ALL_SECONDS (default 540):
#   tests    TRITON_INTERPRET=0 pytest tests/test_accel.py -k cuda (the CUDA graph test; the
#            tests/test_kernels_*.py use CPU tensors only, so their CUDA counterpart is the next step)
#   kernels  python bench/gpu_kernels.py   (each Triton kernel checked on CUDA, then timed)
#   models   python bench/gpu_models.py    (whole models: ours vs diffusers eager and compiled)
# Logs and the new JSON/MD results go to $OUT (at most 8 files); a summary is printed last.
# Environment: GPU_ALL_SECONDS (total budget), PYTHON (interpreter), GPU_MODELS_ARGS (extra flags).

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
WHL=${WHL_DIR:-$ROOT/.whl}

if [ "${1:-}" = "--prepare" ]; then
    # Versions as in the development venv; both wheels are py3-none-any.
    [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python
    mkdir -p "$WHL"
    exec "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHL" \
        "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-10.2.0}"
fi

export PYTHONUNBUFFERED=1
TOTAL=${GPU_ALL_SECONDS:-540}
START=$SECONDS
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
MARK=$(mktemp)
touch "$MARK"
STATUS=()
FAILED=0

left() { echo $((TOTAL - (SECONDS - START))); }

# step NAME LIMIT_SECONDS CMD...: run under timeout, log to $LOGS/NAME.log, record rc and time.
step() {
    local name=$1 limit=$2 t=$SECONDS rc
    shift 2
    if [ "$limit" -lt 20 ]; then
        STATUS+=("$name: skipped (${limit}s left)")
        FAILED=1
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && rc="124 (timed out)"
    STATUS+=("$name: rc=$rc, $((SECONDS - t))s")
    [ "$rc" = 0 ] || FAILED=1
}

# ---- setup: environment, carried wheels ---------------------------------------------------------
{
    echo "=== setup $(date -Is)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv 2>&1 || true
    if compgen -G "$WHL/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHL"/*.whl && echo "installed wheels: $(cd "$WHL" && ls ./*.whl)"
        export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no wheels in $WHL: diffusers baselines will be missing (run 'bash bench/gpu_all.sh --prepare' first)"
        export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("triton", "diffusers", "codec", "kernels", "codec.models.accel", "av", "einops", "safetensors"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:<20} {getattr(m, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {name:<20} MISSING ({type(e).__name__}: {e})")
EOF
} 2>&1 | tee "$LOGS/setup.log"
# The subshell of the pipe above loses the export: set PYTHONPATH again here.
if compgen -G "$WHL/*.whl" >/dev/null; then
    export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

# ---- steps --------------------------------------------------------------------------------------
# Real CUDA kernels, not the interpreter (tests/conftest.py only sets TRITON_INTERPRET by default).
export TRITON_INTERPRET=0
# Only the CUDA test: the CPU ones (dynamo tracing, ~30 s) run in CI and would spend device time.
step tests "$(( $(left) < 60 ? $(left) : 60 ))" \
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -ra tests/test_accel.py -k cuda
step kernels "$(( $(left) < 150 ? $(left) : 150 ))" "$PY" bench/gpu_kernels.py --reps 30
MODELS_LIMIT=$(( $(left) - 10 ))
[ "$MODELS_LIMIT" -gt 450 ] && MODELS_LIMIT=450
# shellcheck disable=SC2086  # GPU_MODELS_ARGS is a list of flags
step models "$MODELS_LIMIT" "$PY" bench/gpu_models.py --budget $((MODELS_LIMIT - 25)) ${GPU_MODELS_ARGS:-}

# ---- results into $OUT, summary last ------------------------------------------------------------
# The newest of each kind written by this run: 3 results + 5 logs = the 8 files $OUT may return.
RESULTS=$(for pat in 'gpu-kernels-*.json' 'gpu-models-*.json' 'gpu-models-*.md'; do
    find bench/results -maxdepth 1 -type f -newer "$MARK" -name "$pat" -printf '%T@ %p\n' 2>/dev/null \
        | sort -n | tail -n 1 | cut -d' ' -f2-
done)
if [ -n "${OUT:-}" ]; then
    for f in $RESULTS; do cp "$f" "$OUT/"; done
fi
{
    echo
    echo "=== summary ($((SECONDS - START))s of ${TOTAL}s)"
    for s in "${STATUS[@]}"; do echo "  $s"; done
    echo "results: ${RESULTS:-none}" | tr '\n' ' '
    echo
    echo "--- kernels"
    sed -n '/^kernel /,/^$/p' "$LOGS/kernels.log" 2>/dev/null
    echo "--- models"
    grep -E '^\| |^problem:|^wrote' "$LOGS/models.log" 2>/dev/null
} 2>&1 | tee "$LOGS/summary.txt"
rm -f "$MARK"
exit $FAILED
