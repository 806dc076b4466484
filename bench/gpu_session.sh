#!/usr/bin/env bash
# One 10-minute call on a GPU machine (bench/RESULTS.md, "The GPU calls"). Runs from the working
# tree with the machine's own python3 (GPU machines here have no package registry), writes logs
# and result files to $OUT (the folder that comes back from the machine; build/gpu-out
# elsewhere), at most 8 files, and ends each command inside the call.
#
#   (no step)  first light, bench.first_light: environment, the gpu_smoke tests, the headline
#              benchmark, a quick tile sweep and N = 128k, each part with its own deadline,
#              540 s in all; `--dry-run` runs the same parts on CPU at toy sizes; carry
#              build/triton-cache (make warm-gpu-cache) with the tree to skip compiling
#   tune       bench.tune_sf: SF-Attn tile candidates timed per kernel
#   test       the test suite compiled on the GPU (make test-gpu, bf16 included), then
#              bench.long_sequence (N = 540,672 and 128k, exact float64 slice checks)
#   bench      bench.run_all: every provider side by side, CSVs, plots, summary
#   paper      bench.pretrain, bench.h2o_quality, bench.context_extension
#
# BENCH_GIT_SHA must name the commit the tree was sent from (the tree travels without .git).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
py=${GPU_PY:-python3}
if [[ $# -eq 0 || $1 == --* ]]; then
    out=${OUT:-build/first-light}
    exec $py -m bench.first_light --out "$out" "$@"
fi
step=$1
: "${BENCH_GIT_SHA:?set BENCH_GIT_SHA to the sha of the commit being run}"
export BENCH_GIT_SHA
out=${OUT:-build/gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/$step.log"
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/$step.log"

case $step in
tune)
    timeout 540 $py -m bench.tune_sf --results-dir "$out" 2>&1 | tee -a "$out/$step.log"
    ;;
test)
    # Compilation dominates on a fresh machine: spread the tests over processes when
    # pytest-xdist is there. SIGINT at the limit makes pytest print the failures it has seen
    # so far (a plain kill would lose them).
    workers=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
    timeout -s INT -k 30 420 $py -m pytest -q $workers --maxfail=20 --durations=10 tests 2>&1 | tee -a "$out/$step.log"
    timeout 150 $py -m bench.long_sequence --results-dir "$out" 2>&1 | tee -a "$out/$step.log"
    ;;
bench)
    timeout 560 $py -m bench.run_all --results-dir "$out" 2>&1 | tee -a "$out/$step.log"
    ;;
paper)
    # The checkpoint (about 38 MB) and finished runs travel back packed in parts under 16 MiB:
    # `cat paper.tar.* | tar xf -` here restores build/paper-{cache,results}; a later call that
    # carries build/paper-cache skips what is done (bench/PAPER_EXPERIMENTS.md).
    cache=build/paper-cache results=build/paper-results
    timeout 560 bash -c "$py -m bench.pretrain --cache-dir $cache \
        && $py -m bench.h2o_quality --cache-dir $cache --results-dir $results \
        && $py -m bench.context_extension --cache-dir $cache --time-budget 200 \
           --results-dir $results" 2>&1 | tee -a "$out/$step.log"
    cp $results/*.md "$out/"
    tar cf - $cache $results | split -b 15M - "$out/paper.tar."
    ;;
*)
    echo "unknown step: $step (none for first light, tune, test, bench or paper)" >&2
    exit 2
    ;;
esac
ls -la "$out"
