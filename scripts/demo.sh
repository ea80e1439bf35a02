#!/usr/bin/env bash
# The real-model demo: LoRA-tune the pretrained all-MiniLM-L6-v2 to classify sentences by topic, on CPU.
#   bash scripts/demo.sh [--out DIR] [--epochs N] [--quick]
# (the tiny offline quick start is examples/quickstart.py)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec python examples/demo_minilm.py "$@"
