#!/usr/bin/env bash
# Prepare what bench/gpu_all.sh needs on a bare device machine (which reaches no package registry).
# Run HERE, once, where pip reaches the registries:
#
#     bash bench/gpu_wheels.sh
#
# 1. bench/wheels/ (git-ignored): the wheels the device image lacks, for its Python (3.12,
#    manylinux x86_64). The image (/work/.library/device/KINDS.md, read 2026-11) has torch 2.11
#    (CUDA 13), triton 3.6, numpy, pillow, matplotlib, tqdm, einops, safetensors 0.8.0,
#    huggingface_hub 1.33.0, regex, requests, filelock, zipp, pytest and hypothesis, so only
#    these travel:
#      av                  PyAV (codec.video: the sparse-cache clips, codec.bench)   abi3 wheel, ~36 MB
#      diffusers           the baselines (eager and compiled)                        ~6.4 MB
#      importlib_metadata  needed by diffusers, not in the image                     small
#      lazy-importer       needed by importlib_metadata 10 on Python < 3.15          small
#    torch and triton are NOT carried (the image has them; a CUDA torch wheel is ~900 MB and
#    triton ~290 MB, far over the 64 MiB a call may carry). This package is not a wheel either:
#    the working tree travels, and gpu_all.sh runs it from there (PYTHONPATH).
# 2. bench/gpu_data (git-ignored): a symbolic link to ../shared/data. The device tool copies a
#    path through a link when `carry` names that path, so the run carries the four clips of
#    issue 12's table and the taef2 weights without copying them into the checkout.
# Prints the sizes against the 64 MiB limit and the device command with its carry list.
# Environment: PYTHON (the pip to use), DEVICE_PYTHON (default 3.12), WHEELS_DIR.

set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ] && PY=$ROOT/.venv/bin/python
DEST=${WHEELS_DIR:-bench/wheels}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
# One version of each (two versions of a name in the folder stop the install there).
WHEELS=(av==18.1.0 diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0)
CLIPS=(squirrel.mp4 smpte-2997.mp4 clip_01_tears_of_steel.mp4 chaplin.mp4)  # bench/sparse_cache.py's

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST" "${WHEELS[@]}" 2>&1 | { grep -v 'is ignored: it is neither' || true; }
echo "wheels in $DEST (python $DEVICE_PYTHON, manylinux x86_64):"
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MB  %s\n", $5 / 1e6, $NF}'

carry=("\"$DEST\"")
data_bytes=0
if [ -d "$ROOT/../shared/data" ]; then
    [ -L bench/gpu_data ] || ln -s ../../shared/data bench/gpu_data
    for c in "${CLIPS[@]}"; do
        carry+=("\"bench/gpu_data/video/$c\"")
        data_bytes=$((data_bytes + $(stat -Lc %s "bench/gpu_data/video/$c")))
    done
    carry+=("\"bench/gpu_data/weights\"")
    data_bytes=$((data_bytes + $(du -sbL bench/gpu_data/weights | cut -f1)))
else
    echo "no ../shared/data here: no clips (issue 12's table is skipped there) and random taef2 weights"
fi

wheel_bytes=$(du -sb "$DEST" | cut -f1)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((wheel_bytes + data_bytes + tree_bytes))
awk -v w="$wheel_bytes" -v d="$data_bytes" -v t="$tree_bytes" 'BEGIN { printf \
    "travels: wheels %.1f MB + data %.1f MB + working tree %.1f MB = %.1f MB of 67.1 MB (64 MiB)\n", \
    w / 1e6, d / 1e6, t / 1e6, (w + d + t) / 1e6 }'
[ "$total" -le $((64 << 20)) ] || { echo "gpu_wheels: over the 64 MiB a device call may carry" >&2; exit 1; }
echo "device command:"
echo "  run(command=\"bash bench/gpu_all.sh\", timeout_s=600,"
joined=$(printf '%s, ' "${carry[@]}")
echo "      carry=[${joined%, }])"
