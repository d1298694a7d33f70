#!/usr/bin/env bash
# Create .venv and install the given requirement files (default interop/requirements.txt),
# re-installing each only when it (or the interop file it may include) changed.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")/.."
PYTHON=${PYTHON:-python3}
venv=.venv

# A venv without its interpreter (moved, or Python upgraded) is unusable: rebuild it.
if [ ! -x "$venv/bin/python" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
fi

for req in "${@:-interop/requirements.txt}"; do
    stamp=$venv/.$(echo "$req" | tr '/' '_').sha256
    want=$(cat "$req" interop/requirements.txt | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
        echo "$want" >"$stamp"
        echo "venv: installed $req into $venv"
    else
        echo "venv: $req up to date in $venv"
    fi
done
