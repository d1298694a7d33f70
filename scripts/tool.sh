#!/usr/bin/env bash
# Make sure command $1 is on PATH, installing Debian package $2 (default: $1) when root;
# otherwise stop with a message naming the package.
set -euo pipefail
cmd=$1
pkg=${2:-$1}
if command -v "$cmd" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "tool: '$cmd' is missing and we are not root; install it with: apt-get install $pkg" >&2
    exit 1
fi
echo "tool: installing $pkg"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
