#!/usr/bin/env bash
# Every GPU check and measurement the project owes, in one call (device time is scarce):
#
#   bash bench/gpu_session.sh [--commit SHA] OUTDIR     on a GPU machine (offline is fine:
#                                                       bench/offline_wheels.sh brings the rest)
#   bash bench/gpu_session.sh --rehearse OUTDIR         every stage on a CPU, tiny settings,
#                                                       under 2 minutes (tests/test_gpu_session.py)
#
# A preflight first (imports, CUDA init, device, commit), then the stages, most important
# first, each under a time limit sized for cold Triton/inductor compiles and capped by what is
# left of the session's budget (GPU_SESSION_BUDGET seconds, default 470: under 8 minutes):
#   tests      the kernel, capture and fast-path tests natively (pytest -n 4, no -x)
#   fastpath   the run's start check: graph+triton vs the eager reference (bench/fastpath.py)
#   learners   size1m-vec and size12m-img, eager / graph / graph+triton (bench/throughput.py)
#   kcount     kernels per update, reference vs Triton (bench/kernel_count.py)
#   packed     packed seeds: one vmapped update of 4 and 16 size1m-vec seeds against solo
#              updates and the batching ceiling (bench/packed.py); next in importance after
#              the first-contact stages (the packed-seeds issue), so before policy and e2e
#   policy     matmul peak and the 64-env policy step
#   kernels    each Triton op vs its reference (bench/kernels.py, no inductor compiles)
#   size200m   the paper's model, graph+triton
#   e2e        run.py on Pong at atari100k with 64 envs (a stand-in env without EnvPool)
# Every stage's full output goes to OUTDIR/session.log; result rows are appended to
# OUTDIR/<bench>-<device>.jsonl as they are measured (a stage cut by its limit gets SIGINT
# and keeps its rows); OUTDIR/summary.txt (also printed) has at most 60 lines. OUTDIR holds
# at most 8 files, none in subfolders (what a remote machine can send back).
# Python: ${PYTHON:-python3}. The commit: --commit, else DREAMER_FAST_COMMIT, else git, else
# the COMMIT file bench/offline_wheels.sh writes beside the wheels (${WHEELS:-.whl}/COMMIT).
set -u
rehearse=0
commit=${DREAMER_FAST_COMMIT:-}
out=
while [ $# -gt 0 ]; do
    case $1 in
        --rehearse) rehearse=1; shift ;;
        --commit) commit=$2; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) out=$1; shift ;;
    esac
done
if [ -z "$out" ]; then
    echo "usage: bash bench/gpu_session.sh [--rehearse] [--commit SHA] OUTDIR" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$root" || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
budget=${GPU_SESSION_BUDGET:-$([ $rehearse = 1 ] && echo 110 || echo 470)}
t0=$(date +%s)
log="$out/session.log"
: > "$log"
: > "$out/stages.tsv"

if [ -z "$commit" ]; then
    commit=$(git rev-parse HEAD 2>/dev/null) || commit=
    if [ -n "$commit" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        commit="$commit-dirty"
    fi
fi
if [ -z "$commit" ] && [ -f "${WHEELS:-.whl}/COMMIT" ]; then
    commit=$(cat "${WHEELS:-.whl}/COMMIT")
fi
export DREAMER_FAST_COMMIT=${commit:-unknown}

stage() {  # stage NAME LIMIT COMMAND...: run under the limit (SIGINT, then KILL), log all
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - t0)))
    if [ "$left" -lt 15 ]; then
        printf '%s\tskip\t0\t%s\tno time left in the %ss budget\n' "$name" "$limit" "$budget" \
            >> "$out/stages.tsv"
        echo "== $name skipped: no time left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $(date +%T) $name (limit ${limit}s): $*" | tee -a "$log"
    local tmp start rc note
    tmp=$(mktemp)
    start=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$tmp" 2>&1
    rc=$?
    cat "$tmp" >> "$log"
    tail -n 3 "$tmp"
    note=$(grep -E '[0-9]+ (passed|failed|error)' "$tmp" | tail -n 1 | tr -d '=' | xargs)
    rm -f "$tmp"
    echo "== $name rc $rc in $(($(date +%s) - start))s" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" "$limit" "$note" \
        >> "$out/stages.tsv"
}

# ---------------------------------------------------------------- preflight
tag=$("$PY" - "$rehearse" <<'EOF' 2>> "$log"
import importlib, sys
rehearse = sys.argv[1] == "1"
missing = []
for name in ("torch", "numpy", "triton", "tyro", "gymnasium", "tensorboard", "dreamer_fast.config",
             "dreamer_fast.run.session", "bench.throughput"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    print("preflight: cannot import " + "; ".join(missing) + " -- bring the wheels: bash "
          "bench/offline_wheels.sh .whl, then pip install --no-index --target ... .whl/*.whl",
          file=sys.stderr)
    sys.exit(1)
import torch
if rehearse:
    print("cpu-rehearsal")
else:
    torch.cuda.init()
    print(torch.cuda.get_device_name().replace(" ", "-").lower())
EOF
)
rc=$?
pre=$("$PY" -c "import torch, triton, sys; print(f'python {sys.version.split()[0]} torch {torch.__version__} triton {triton.__version__} cuda {torch.version.cuda}')" 2>/dev/null)
echo "preflight: device ${tag:-?} | $pre | commit $DREAMER_FAST_COMMIT | budget ${budget}s" | tee -a "$log"
printf 'preflight\t%s\t%s\t15\t%s\n' "$rc" "$(($(date +%s) - t0))" "${tag:-no device}" >> "$out/stages.tsv"
if [ "$rc" != 0 ]; then
    tail -n 5 "$log"
    "$PY" bench/session_summary.py "$out" | tee "$out/summary.txt"
    exit 1
fi

# ---------------------------------------------------------------- stages
res() { echo "$out/$1-$tag.jsonl"; }
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)
if [ $rehearse = 1 ]; then
    stage tests 60 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_graphs.py \
        tests/test_fastpath.py -k "catches_every_rule or capture_failure"
    stage fastpath 60 "$PY" bench/fastpath.py --workloads learner-debug-img --batch-length 4 \
        --out "$(res fastpath)"
    stage learners 40 "$PY" bench/throughput.py --workloads learner-control-vec \
        --modes eager graph+triton --iters 1 --burnin 0 --out "$(res throughput)"
    stage kcount 40 "$PY" bench/kernel_count.py --workloads size1m-vec --modes ref \
        --out "$(res kernel-count)"
    stage packed 30 "$PY" bench/packed.py --workloads learner-control-vec --seeds 2 \
        --iters 1 --burnin 0 --out "$(res packed)"
    stage policy 30 "$PY" bench/throughput.py --workloads matmul-peak --iters 1 --burnin 0 \
        --out "$(res throughput)"
    stage kernels 40 "$PY" bench/kernels.py --sizes size12m --cases rms_silu-obs-hidden \
        --impls eager fused --modes both --iters 1 --burnin 0 --out "$(res kernels)"
    stage size200m 20 "$PY" bench/throughput.py --workloads learner-size200m-img \
        --modes graph+triton --out "$(res throughput)"
    stage e2e 45 "$PY" bench/throughput.py --workloads e2e-pong-64 --modes fused \
        --e2e-steps 250 --e2e-batch 2 8 --e2e-envs 8 --e2e-ratio 16 --e2e-log-every 2 \
        --e2e-env standin \
        --out "$(res throughput)"
else
    stage tests 100 "$PY" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" \
        tests/test_kernels.py tests/test_graphs.py tests/test_fastpath.py
    stage fastpath 50 "$PY" bench/fastpath.py --out "$(res fastpath)"
    stage learners 100 "$PY" bench/throughput.py --workloads learner-size1m-vec \
        learner-size12m-img --modes eager graph graph+triton --iters 10 --burnin 2 \
        --price 2.5 --out "$(res throughput)"
    stage kcount 35 "$PY" bench/kernel_count.py --modes ref triton --out "$(res kernel-count)"
    stage packed 35 "$PY" bench/packed.py --workloads learner-size1m-vec --seeds 4 16 \
        --iters 3 --burnin 1 --out "$(res packed)"
    stage policy 30 "$PY" bench/throughput.py --workloads matmul-peak policy-64envs \
        --modes eager graph graph+triton --iters 20 --burnin 3 --out "$(res throughput)"
    stage kernels 30 "$PY" bench/kernels.py --sizes size12m --impls triton eager triton-graph \
        eager-graph --iters 30 --burnin 5 --out "$(res kernels)"
    stage size200m 40 "$PY" bench/throughput.py --workloads learner-size200m-img \
        --modes graph+triton --iters 5 --burnin 2 --price 2.5 --out "$(res throughput)"
    stage e2e 90 "$PY" bench/throughput.py --workloads e2e-pong-64 --modes graph+triton \
        --e2e-steps 9000 --price 2.5 --out "$(res throughput)"
fi

echo "== done in $(($(date +%s) - t0))s; summary:" | tee -a "$log"
"$PY" bench/session_summary.py "$out" | tee "$out/summary.txt"
