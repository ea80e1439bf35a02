#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) and install peftkit in editable mode with dev extras.
#
#   bash scripts/setup.sh          # set up only
#   source scripts/setup.sh        # set up, cd to the repo root and put .venv/bin first on PATH
#
# Idempotent: the pip step is skipped while .venv/.peftkit-installed holds the sha256 of
# pyproject.toml + constraints.txt. Installs always use constraints.txt (pins the CPU torch build;
# an unpinned torch would pull gigabytes of CUDA wheels). Index/mirror settings come from pip's own config.

_peftkit_setup() {
    local root venv stamp want have pyv
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    cd "$root" || return 1
    venv="$root/.venv"
    stamp="$venv/.peftkit-installed"

    if [ ! -x "$venv/bin/python" ]; then
        echo "[setup] creating $venv" >&2
        python3 -m venv "$venv" || return 1
        rm -f "$stamp"
    fi

    want="$(cat pyproject.toml constraints.txt | "$venv/bin/python" -c \
        'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')" || return 1
    have="$(cat "$stamp" 2>/dev/null || true)"

    if [ "$want" != "$have" ]; then
        # Editable installs of a pyproject-only project need pip >= 21.3 (PEP 660); only upgrade older pips.
        pyv="$("$venv/bin/python" -c 'import pip; print(int(tuple(map(int, pip.__version__.split(".")[:2])) >= (21, 3)))' 2>/dev/null || echo 0)"
        if [ "$pyv" != "1" ]; then
            echo "[setup] upgrading pip (too old for editable pyproject installs)" >&2
            "$venv/bin/python" -m pip install -c constraints.txt "pip>=21.3" || return 1
        fi
        echo "[setup] pip install -c constraints.txt -e .[dev]" >&2
        "$venv/bin/python" -m pip install -c constraints.txt -e ".[dev]" || return 1
        printf '%s\n' "$want" > "$stamp.tmp" && mv -f "$stamp.tmp" "$stamp" || return 1
    fi

    export VIRTUAL_ENV="$venv"
    case ":$PATH:" in
        *":$venv/bin:"*) ;;
        *) export PATH="$venv/bin:$PATH" ;;
    esac
    hash -r 2>/dev/null || true
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # sourced: leave the caller in the repo root with the venv on PATH
    _peftkit_setup || return $?
else
    set -euo pipefail
    _peftkit_setup
fi
