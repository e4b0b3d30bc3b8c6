#!/usr/bin/env bash
# The GPU check of training and extraction, in one run (at most ~6 minutes on one H100/H200):
#
#   benchmarks/gpu_check.sh OUTDIR [--device cpu] [--quick]
#
# Needs only this working tree and what a GPU machine with PyTorch has (torch, pytest,
# safetensors), plus eai-sparsify for its columns (pip install eai-sparsify==1.3.3 --no-deps).
# Writes into OUTDIR:
#   env.txt            GPU, driver, CUDA and torch versions
#   test_cuda.log      pytest tests/test_cuda.py (on the CPU its tests skip)
#   step.md            the step table at six shapes (ours, dense32, dense16, graph16, sp32, sp16)
#                      and ours for each of the four architectures
#   e2e.md             train_sae end to end at batch 500 and 4096, and 1/2/4/8 trials sharing
#   profile.txt        where a step's time goes (torch.profiler, B=500)
#   extract.md         a model actor's loop at batch 256 on 500x375 JPEGs: nvJPEG on the GPU
#                      against CPU threads and processes, and the plain HF loop
#   extract_ray.md     extract through Ray Data with one GPU actor, where Ray imports
#   timings.log        each part's command and seconds
#   summary.md         everything above but the logs, in one file
# Rehearse on a machine without a GPU with `--device cpu --quick` (small shapes, few steps).
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--device cuda|cpu] [--quick]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1; shift
device=cuda quick=()
while [ $# -gt 0 ]; do
    case $1 in
        --device) [ $# -ge 2 ] || usage; device=$2; shift 2 ;;
        --quick) quick=(--quick); shift ;;
        *) usage ;;
    esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
rm -f "$out/timings.log"
cd "$root" || exit 1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
failed=()

run() {  # run NAME FILE CMD...: CMD's output into FILE (and the terminal), NAME if it fails
    local name=$1 file=$2; shift 2
    echo "== $name: $*" | tee -a "$out/timings.log"
    local t0=$SECONDS
    if ! "$@" 2>&1 | tee "$out/$file"; then failed+=("$name"); fi
    echo "== $name: $((SECONDS - t0)) s" | tee -a "$out/timings.log"
}

{
    date -u
    "$py" -c 'import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import sparsify, importlib.metadata as m
    print("eai-sparsify", m.version("eai-sparsify"))
except ImportError:
    print("eai-sparsify missing: its columns are skipped")'
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    fi
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

if [ "$device" = cuda ]; then
    run test_cuda test_cuda.log "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
else
    run test_cuda test_cuda.log "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        tests/test_step_capture.py
fi
run step step.md "$py" benchmarks/bench_sae_step.py --device "$device" --shapes gpu \
    --architectures "${quick[@]}"
run e2e e2e.md "$py" benchmarks/bench_train_e2e.py --device "$device" "${quick[@]}"
run profile profile.txt "$py" benchmarks/profile_step.py --device "$device" --batch 500
inner=256
[ ${#quick[@]} -gt 0 ] && inner=32
run extract extract.md "$py" benchmarks/bench_extract.py --inner-only --device "$device" \
    --inner-batch "$inner"
if "$py" -c "import ray, mlflow" 2>/dev/null; then
    run extract_ray extract_ray.md "$py" benchmarks/bench_extract.py --device "$device" \
        --images 4096 --runs 1 --ray-data --inner-batch "$inner"
else
    echo "Ray is not importable here: extraction through Ray Data is not measured" \
        | tee "$out/extract_ray.md"
fi

{
    echo "# GPU check, $(date -u +%F)"
    echo; echo '```'; cat "$out/env.txt"; echo '```'
    echo; echo "## tests/test_cuda.py"; echo; echo '```'; tail -n 3 "$out/test_cuda.log"; echo '```'
    echo; echo "## The training step"; echo; cat "$out/step.md"
    echo; echo "## End to end and trials sharing the device"; echo; cat "$out/e2e.md"
    echo; echo "## Where a step's time goes (B=500)"; echo; echo '```'
    head -n 30 "$out/profile.txt"; echo '```'
    echo; echo "## Extraction: a model actor's loop"; echo; cat "$out/extract.md"
    echo; cat "$out/extract_ray.md"
    echo; echo "## Seconds per part"; echo; echo '```'; cat "$out/timings.log"; echo '```'
} >"$out/summary.md"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]} (logs in $out)" >&2
    exit 1
fi
echo "gpu_check: all parts ran; tables in $out/summary.md"
