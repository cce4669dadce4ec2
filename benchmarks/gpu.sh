#!/usr/bin/env bash
# The GPU benchmark (benchmarks/gpu.py): fast CIFAR recipe vs baseline, packing K runs on one GPU,
# and the influence GEMM, each as a ratio measured side by side; a few minutes on one GPU.
#
#   bash benchmarks/gpu.sh              # on a machine with a GPU
#   bash benchmarks/gpu.sh --dry-run    # anywhere: CPU, tiny sizes, seconds
#   bash benchmarks/gpu.sh --help       # options (--only, --epochs, --runs, --k, --json)
#
# Runs from the repository root with the project's virtual environment when there is one, so that it
# measures the code and libraries of this checkout; the report goes to stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ -x "$root/.venv/bin/python" ]]; then
    python="$root/.venv/bin/python"
else
    python="$(command -v python3 || command -v python || true)"
    if [[ -z "$python" ]]; then
        echo "error: no Python found: expected $root/.venv/bin/python or python3 on PATH" >&2
        exit 2
    fi
fi
exec "$python" benchmarks/gpu.py "$@"
