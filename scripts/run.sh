#!/usr/bin/env bash
# Run the worker and the web app together on the local services; Ctrl-C stops both.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")/.."
bin=${BIN_DIR:-target/debug}
config=${CONFIG:-celeryconfig.toml}

"$bin/web" --config "$config" --migrate
"$bin/worker" --config "$config" --loglevel info &
worker=$!
trap 'kill "$worker" 2>/dev/null || true; wait "$worker" 2>/dev/null || true' EXIT INT TERM
"$bin/web" --config "$config" --loglevel info
