#!/usr/bin/env bash
# Every GPU check and measurement the project still owes, in one call (device time is scarce):
#   bash bench/gpu_session.sh [OUTDIR]      (OUTDIR gets the logs and result files)
# 1. the kernel and graph tests natively; 2. kernels vs references; 3. the throughput suite in
# every mode (matmul peak, learners, policy step, EnvPool alone, end-to-end Pong).
set -u
out=${1:-bench/results}
mkdir -p "$out"
tag=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())")
python -m pytest -q tests/test_kernels.py tests/test_graphs.py 2>&1 | tail -40 | tee "$out/gpu-tests-$tag.log"
python bench/kernels.py --out "$out/kernels-$tag.jsonl" 2>&1 | tail -40
python bench/throughput.py --workloads matmul-peak learner-size12m-img learner-size1m-vec \
    policy-64envs env-pong-64 --modes eager compile graph graph+triton --iters 20 --burnin 3 \
    --price 2.5 --out "$out/throughput-$tag.jsonl"
python bench/throughput.py --workloads matmul-peak learner-size200m-img --modes graph+triton \
    --iters 10 --burnin 3 --price 2.5 --out "$out/throughput-$tag.jsonl"
python bench/throughput.py --workloads e2e-pong-64 --modes graph+triton --price 2.5 \
    --out "$out/throughput-$tag.jsonl"
