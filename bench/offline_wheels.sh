#!/usr/bin/env bash
# Wheels of every package bench/gpu_session.sh needs that an offline GPU machine lacks, for
# Python 3.12 on manylinux x86-64, into DIR (one version of each), plus DIR/COMMIT (this
# checkout's commit: the tree that travels has no .git):
#
#   bash bench/offline_wheels.sh DIR
#
# The machine has torch + CUDA, triton, numpy, pytest, pytest-xdist, tensorboard, opencv,
# imageio and pillow; it lacks tyro (with docstring_parser, typeguard, typing_extensions) and
# gymnasium (with cloudpickle, farama_notifications). Not brought, as too large for a call
# (64 MiB with the repository): EnvPool (61 MiB plus 65-92 MB of asset wheels; the end-to-end
# stage uses bench/standin.py instead) and imageio-ffmpeg (65 MiB; without it a run's report
# videos are skipped with one line, the TensorBoard GIFs stay).
# Versions are the ones installed here when there are (what the tests ran with).
# On the machine: python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
# and PYTHONPATH=/tmp/site. Prints the total size and checks it against the 64 MiB limit.
set -euo pipefail
dir=${1:?usage: bash bench/offline_wheels.sh DIR}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$dir"
packages=(tyro docstring_parser typeguard typing_extensions gymnasium cloudpickle
          farama_notifications)
specs=$("$PY" - "${packages[@]}" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
PYEOF
)
rm -f "$dir"/*.whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" $specs 2>&1 | grep -v "is ignored: it is neither" || true
for name in "${packages[@]}"; do
    ls "$dir"/"$name"-*.whl > /dev/null 2>&1 || { echo "missing wheel: $name" >&2; exit 1; }
done
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit-dirty"
echo "$commit" > "$dir/COMMIT"
wheels=$(du -cb "$dir"/*.whl | tail -n 1 | cut -f1)
repo=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
total=$((wheels + repo))
echo "wheels: $(ls "$dir"/*.whl | wc -l) files, $((wheels / 1048576)) MiB; with the tracked" \
     "files $((total / 1048576)) MiB of the 64 MiB a call carries; commit $commit"
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "too large for one call: repository + wheels exceed 64 MiB" >&2
    exit 1
fi
