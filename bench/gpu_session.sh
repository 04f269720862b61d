#!/usr/bin/env bash
# Every GPU check and measurement the project still owes, in one call (device time is scarce):
#   bash bench/gpu_session.sh [OUTDIR]      (OUTDIR gets the logs and result files)
# Most important first, each stage under its own timeout (about 7.5 minutes in all), every
# stage's rows written as it finishes, so a cut-short session still leaves its first results:
# 1. the kernel and graph tests natively; 2. kernels per update (bench/kernel_count.py);
# 3. the size1m and size12m learners eager / graph / graph+triton (the graphed GPU path);
# 4. matmul peak and the policy step; 5. kernels vs references; 6. size200m graph+triton;
# 7. end-to-end Pong.
set -u
out=${1:-bench/results}
mkdir -p "$out"
tag=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
log="$out/gpu-session-$tag.log"

stage() {  # stage SECONDS COMMAND...: run under a timeout (SIGINT, then KILL), log the tail
    local limit=$1
    shift
    echo "== $(date +%T) stage (limit ${limit}s): $*" | tee -a "$log"
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$out/.stage.log" 2>&1
    local rc=$?
    tail -40 "$out/.stage.log" | tee -a "$log"
    echo "== rc $rc" | tee -a "$log"
}

stage 90 python -m pytest -q -x tests/test_kernels.py tests/test_graphs.py
stage 30 python bench/kernel_count.py --modes ref triton --out "$out/kernel-count-$tag.jsonl"
stage 120 python bench/throughput.py --workloads learner-size1m-vec learner-size12m-img \
    --modes eager graph graph+triton --iters 10 --burnin 2 --price 2.5 \
    --out "$out/throughput-$tag.jsonl"
stage 45 python bench/throughput.py --workloads matmul-peak policy-64envs \
    --modes eager graph graph+triton --iters 20 --burnin 3 --out "$out/throughput-$tag.jsonl"
stage 45 python bench/kernels.py --sizes size12m --iters 30 --burnin 5 \
    --out "$out/kernels-$tag.jsonl"
stage 60 python bench/throughput.py --workloads learner-size200m-img --modes graph+triton \
    --iters 5 --burnin 2 --price 2.5 --out "$out/throughput-$tag.jsonl"
stage 60 python bench/throughput.py --workloads e2e-pong-64 --modes graph+triton --price 2.5 \
    --out "$out/throughput-$tag.jsonl"
rm -f "$out/.stage.log"
