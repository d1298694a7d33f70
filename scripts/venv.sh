#!/usr/bin/env bash
# Create .venv and install interop/requirements.txt, re-installing only when it changed.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")/.."
PYTHON=${PYTHON:-python3}
venv=.venv
req=interop/requirements.txt
stamp=$venv/.requirements.sha256

# A venv without its interpreter (moved, or Python upgraded) is unusable: rebuild it.
if [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
fi

want=$(sha256sum "$req" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
    echo "venv: installed $req into $venv"
else
    echo "venv: $venv up to date"
fi
