#!/usr/bin/env bash
# The ONE script a GPU session runs, as one device call of at most 10 minutes:
#
#     bash bench/gpu_wheels.sh        # here, once: wheels into bench/wheels, the data link, sizes
#     run(command="bash bench/gpu_all.sh", timeout_s=600, carry=[...as gpu_wheels.sh prints...])
#     bash bench/gpu_all.sh --dry-run # here, on the CPU: every step on tiny shapes, fresh venv
#
# On the device machine (no network; its image has python3 3.12 with torch, triton, numpy,
# pytest, ...: /work/.library/device/KINDS.md) the carried wheels are installed with
# `pip install --no-index --find-links bench/wheels` (nothing is fetched) and the repository runs
# from its checkout (PYTHONPATH). Steps, each under `timeout`, all inside GPU_ALL_SECONDS (default
# 560 s; the sparse step's share is kept back while the models run):
#   setup    install the wheels, print the GPU and the versions
#   tests    pytest tests/test_accel.py -k cuda, real Triton kernels (TRITON_INTERPRET=0)
#   sync-tests  pytest tests/test_sync_free.py when it exists (its torch.cuda.set_sync_debug_mode checks)
#   kernels  bench/gpu_kernels.py: every kernel on CUDA against its torch reference, then timed
#   models   bench/gpu_models.py: SD 1.x widths (512, 1080p), tiny models at 1080p, fp16, batch 1:
#            ours vs diffusers eager and torch.compile'd (same weights, same run); a compile is
#            skipped, with a line saying so, when too little of the budget is left
#   sparse   bench/sparse_cache.py (issue 12's table) on the carried clips, 16 frames, with
#            --device cuda; skipped with a line saying why when the clips were not carried or the
#            script has no --device option (then the table is CPU-only)
#   summary  summary.md: the steps, issue 15's targets met/MISSED, the kernel checks, the tables
# Output, in $OUT (the device tool's folder; else bench/results/gpu-<date>/, dry run
# /tmp/gpu_all_dry/), 8 files at most as the device tool returns: run.log, summary.md,
# kernels.json, models.json, models.md, sparse_cache.{json,md,png}. Exit status 1 if a step failed.
# --dry-run (or GPU_ALL_DRY=1): a FRESH venv (/tmp/gpu_all_dry_venv) with what the device image
# has (CPU torch 2.13.0, triton, numpy, pytest, ... from the registries), then the same
# `pip install --no-index` from bench/wheels with pip's configuration switched off (proves the wheel
# set complete), then every step with tiny shapes on the CPU (the numbers are no measurement).
# Environment: GPU_ALL_SECONDS, PYTHON (device interpreter, default python3), GPU_MODELS_ARGS.

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DRY=${GPU_ALL_DRY:-0}
case "${1:-}" in
    "") ;;
    --dry-run) DRY=1 ;;
    *) echo "gpu_all.sh: unknown argument '$1' (expected nothing or --dry-run)" >&2; exit 2 ;;
esac
WHEELS=$ROOT/bench/wheels
DATA=$ROOT/bench/gpu_data  # carried through the link gpu_wheels.sh makes
CLIPS=(squirrel.mp4 smpte-2997.mp4 clip_01_tears_of_steel.mp4 chaplin.mp4)
if [ -n "${OUT:-}" ]; then RES=$OUT
elif [ "$DRY" = 1 ]; then RES=/tmp/gpu_all_dry
else RES=$ROOT/bench/results/gpu-$(date -u +%Y-%m-%d)
fi
[ "$DRY" = 1 ] && [ -z "${OUT:-}" ] && rm -rf "$RES"
mkdir -p "$RES" || exit 2
TOTAL=${GPU_ALL_SECONDS:-$([ "$DRY" = 1 ] && echo 900 || echo 560)}
SPARSE_RESERVE=90  # seconds kept for the sparse step while the models run (when it will run)
export PYTHONUNBUFFERED=1

left() { echo $((TOTAL - (SECONDS - START))); }
min() { echo $(($1 < $2 ? $1 : $2)); }

STATUS=()
FAILED=0
# step NAME LIMIT CMD...: run CMD under `timeout LIMIT`, record its exit status and time.
step() {
    local name=$1 limit=$2 t=$SECONDS rc
    shift 2
    if [ "$limit" -lt 20 ]; then
        echo "=== $name: SKIPPED, ${limit} s of the budget left"
        STATUS+=("$name: skipped (${limit} s left)")
        FAILED=1
        return
    fi
    echo
    echo "=== $name ($((SECONDS - START)) s in, limit ${limit} s): $*"
    timeout -k 10 "$limit" "$@"
    rc=$?
    case $rc in
        0) STATUS+=("$name: ok, $((SECONDS - t)) s") ;;
        124|137) STATUS+=("$name: TIMED OUT after $((SECONDS - t)) s"); FAILED=1 ;;
        *) STATUS+=("$name: FAILED (exit $rc), $((SECONDS - t)) s"); FAILED=1 ;;
    esac
}

# fn_step NAME FUNCTION: a shell function that sets variables here (its commands carry their own timeouts).
fn_step() {
    local name=$1 t=$SECONDS
    shift
    echo
    echo "=== $name ($((SECONDS - START)) s in)"
    if "$@"; then
        STATUS+=("$name: ok, $((SECONDS - t)) s")
    else
        STATUS+=("$name: FAILED, $((SECONDS - t)) s")
        FAILED=1
        return 1
    fi
}

skip() {  # skip NAME WHY
    echo
    echo "=== $1: SKIPPED: $2"
    STATUS+=("$1: skipped: $2")
}

dry_venv() {  # a fresh venv standing in for the device image (which has no diffusers, av, ...)
    local venv=/tmp/gpu_all_dry_venv
    rm -rf "$venv"
    python3.11 -m venv "$venv" || return 1
    timeout 400 "$venv/bin/python" -m pip install -q torch==2.13.0 triton==3.9.0 numpy pillow matplotlib tqdm pytest \
        hypothesis einops safetensors==0.8.0 huggingface_hub==1.33.0 regex requests filelock zipp \
        2>&1 | { grep -v 'is ignored: it is neither' || true; } || return 1
    PY=$venv/bin/python
}

setup() {
    echo "=== setup $(date -u -Is), budget ${TOTAL} s, results in $RES$([ "$DRY" = 1 ] && echo ', DRY RUN (CPU)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv 2>&1 || true
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "no wheels in bench/wheels: run 'bash bench/gpu_wheels.sh' on a machine with pip access and carry bench/wheels"
        return 1
    fi
    # Only bench/wheels: no index, and pip's own configuration (find-links, indexes) switched off.
    env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        timeout 150 "$PY" -m pip install --no-index --no-compile --no-cache-dir --disable-pip-version-check \
        --find-links "$WHEELS" av diffusers || { echo "pip install from bench/wheels FAILED"; return 1; }
    "$PY" - <<'EOF'
import importlib, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("triton", "diffusers", "av", "safetensors", "einops", "numpy", "codec", "kernels", "codec.bench"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:<14} {getattr(m, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {name:<14} MISSING ({type(e).__name__}: {e})")
EOF
}

# sparse_plan: SPARSE_ARGS for issue 12's table, or SPARSE_SKIP saying why it cannot run here
# (on CUDA only through sparse_cache.py's --device: its CPU table comes from the CPU machines).
sparse_plan() {
    local have=() c
    SPARSE_ARGS=() SPARSE_SKIP=""
    for c in "${CLIPS[@]}"; do [ -f "$DATA/video/$c" ] && have+=("$c"); done
    if [ ${#have[@]} = 0 ]; then
        SPARSE_SKIP="no clips in bench/gpu_data/video (run bench/gpu_wheels.sh, carry them): issue 12's GPU table unmeasured"
    elif [ "$DRY" = 1 ]; then
        SPARSE_ARGS=(--frames 3 --reps 1 --crop 64x48 --modes exact 4)
    elif "$PY" bench/sparse_cache.py --help 2>/dev/null | grep -q -- '--device'; then
        SPARSE_ARGS=(--device cuda --frames 16 --reps 2 --crop 1280x720 --modes exact 4 8 16)
    else
        SPARSE_SKIP="bench/sparse_cache.py has no --device option (CPU only): issue 12's GPU table unmeasured"
    fi
    SPARSE_ARGS+=(--data "$DATA/video" --clips "${have[@]}" --out "$RES/sparse_cache")
    [ -z "$SPARSE_SKIP" ] || SPARSE_RESERVE=0
}

summary() {
    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git checkout here)")
    COMMIT=$commit STEPS=$(printf '%s\n' "${STATUS[@]}") WALL=$((SECONDS - START)) TOTAL=$TOTAL "$PY" - "$RES" <<'EOF'
import json, os, pathlib, sys
res = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((res / name).read_text())
    except (OSError, ValueError):
        return None
kern, models, sparse = load("kernels.json"), load("models.json"), load("sparse_cache.json")
dev = (models or kern or {}).get("meta", {}).get("device", "unknown device")
md = [f"# bench/gpu_all.sh on {dev}", "",
      f"git {os.environ['COMMIT']}; {os.environ['WALL']} s of a {os.environ['TOTAL']} s budget.", "", "## Steps", ""]
md += [f"- {s}" for s in os.environ["STEPS"].splitlines() if s]
md += ["", "## Issue 15's targets (ours, fp16, batch 1, per frame)", ""]
rows = [s for s in (models or {}).get("summary", []) if s.get("target")]
if rows:
    md += ["| case | op | ours ms | diffusers eager ms | diffusers compiled ms | target |", "|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.2f}"
    md += [f"| {s['case']} | {s['op']} | {f(s['ms'].get('ours'))} | {f(s['ms'].get('diffusers-eager'))} "
           f"| {f(s['ms'].get('diffusers-compiled'))} | {s['target']} |" for s in rows]
else:
    md.append("Not measured (no CUDA models table in this run).")
if kern:
    m = kern["meta"]
    md += ["", f"## Kernels against their torch references ({m['device']})", ""]
    md.append(f"{m['checks_passed']} of {m['checks_passed'] + m['checks_failed']} checks passed"
              + (f"; FALLBACK to the reference: {m['fallbacks']}" if m.get("fallbacks") else "") + ".")
    md += [f"- {'ok' if c['ok'] else 'FAIL'}: {c['name']}: {c['detail']}" for c in kern["checks"]]
    if kern["results"]:
        md += ["", "| kernel | ms | reference ms | speed-up | of copy bandwidth |", "|---|---|---|---|---|"]
        md += [f"| {r['kernel']} | {r['ms']:.3f} | {r['baseline_ms']:.3f} | {r['speedup']:.2f} | {r['of_copy']:.0%} |"
               for r in kern["results"]]
else:
    md += ["", "## Kernels against their torch references", "", "No result (see run.log)."]
for title, name in (("Models: ours vs diffusers", "models.md"), ("Sparse temporal cache (issue 12)", "sparse_cache.md")):
    md += ["", f"## {title}", ""]
    path = res / name
    md += path.read_text().splitlines()[1:] if path.exists() else ["Not measured in this run (see Steps)."]
(res / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
}

main() {
    START=$SECONDS
    PY=${PYTHON:-python3}
    if [ "$DRY" = 1 ]; then
        fn_step venv dry_venv || return 1
    fi
    fn_step setup setup
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    sparse_plan
    local pytest=("$PY" -m pytest -q -p no:cacheprovider -o addopts="" -ra)
    if [ "$DRY" = 1 ]; then
        step tests "$(min 120 "$(left)")" "${pytest[@]}" tests/test_accel.py -k cuda
        [ -f tests/test_sync_free.py ] && step sync-tests "$(min 120 "$(left)")" "${pytest[@]}" tests/test_sync_free.py
        step kernels "$(min 120 "$(left)")" env TRITON_INTERPRET=1 "$PY" bench/gpu_kernels.py --smoke \
            --json "$RES/kernels.json"
        # shellcheck disable=SC2086  # GPU_MODELS_ARGS is a list of flags
        step models "$(min 300 $(($(left) - SPARSE_RESERVE)))" env TRITON_INTERPRET=0 "$PY" bench/gpu_models.py \
            --smoke --stem "$RES/models" --taef2-weights "$DATA/weights" ${GPU_MODELS_ARGS:-}
    else
        export TRITON_INTERPRET=0  # real CUDA kernels (tests/conftest.py defaults it to 1)
        step tests "$(min 60 "$(left)")" "${pytest[@]}" tests/test_accel.py -k cuda
        [ -f tests/test_sync_free.py ] && step sync-tests "$(min 90 "$(left)")" "${pytest[@]}" tests/test_sync_free.py
        step kernels "$(min 120 "$(left)")" "$PY" bench/gpu_kernels.py --reps 30 --json "$RES/kernels.json"
        local limit
        limit=$(min 420 $(($(left) - SPARSE_RESERVE - 15)))
        # shellcheck disable=SC2086
        step models "$limit" "$PY" bench/gpu_models.py --budget $((limit - 20)) --compile-cap 300 \
            --stem "$RES/models" --taef2-weights "$DATA/weights" ${GPU_MODELS_ARGS:-}
    fi
    if [ -n "$SPARSE_SKIP" ]; then
        skip sparse "$SPARSE_SKIP"
    else
        step sparse "$(min 150 $(($(left) - 15)))" "$PY" bench/sparse_cache.py "${SPARSE_ARGS[@]}"
    fi
    echo
    echo "=== summary ($((SECONDS - START)) s)"
    summary
    local n
    n=$(find "$RES" -type f | wc -l)
    [ "$n" -le 8 ] || echo "WARNING: $n files in $RES; the device tool returns 8 at most"
    return $FAILED
}

main 2>&1 | tee "$RES/run.log"
exit "${PIPESTATUS[0]}"
