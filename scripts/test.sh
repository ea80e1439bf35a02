#!/usr/bin/env bash
# Run the test suite: bash scripts/test.sh [pytest args...]
# Runs everything but the tests marked `slow` (the conformance suite's other task cases, the compile checks);
# `bash scripts/test.sh -m slow` runs those (a later -m wins), `-m ""` runs both tiers. CI (.ci/run) runs both.
# Paths in the arguments are relative to the repo root. pytest's exit code is returned unchanged
# (5 = "no tests collected" is therefore a failure).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -n 2 -q -m "not slow" "$@"
