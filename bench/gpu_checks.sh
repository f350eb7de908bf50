#!/usr/bin/env bash
# The GPU checks of issue 11 as one script, sized for a short device lease (at most 12 minutes:
# each step has its own timeout, so that one slow step cannot eat the
# others' time). Results go to $OUT (default bench-out/) as JSON plus a log.
#
#   ELUCD=/path/to/EluCD bash bench/gpu_checks.sh      # with the side-by-side reference
#   bash bench/gpu_checks.sh                            # fguide alone
#
# ELUCD is a checkout of github.com/AlexMaOLS/EluCD (its DDPM/guided_diffusion is imported by
# bench_speed.py under a private name; nothing of it enters fguide).
set -u
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
step() {  # step NAME SECONDS CMD...: run with a timeout, log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
    echo "-- $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/log.txt"
step torchvision-parity 120 python -m pytest -q tests/test_torchvision_parity.py
step speed 300 python bench/bench_speed.py --out "$OUT/speed.json" ${ELUCD:+--reference "$ELUCD"}
step sampling 120 python bench/bench_sampling.py --out "$OUT/sampling.json"
step edm 90 python bench/bench_edm.py --out "$OUT/edm.json"
step dit 90 python bench/bench_dit.py --out "$OUT/dit.json"
