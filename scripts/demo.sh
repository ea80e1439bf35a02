#!/usr/bin/env bash
# Run the quickstart example: bash scripts/demo.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python examples/quickstart.py "$@"
