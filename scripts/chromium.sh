#!/usr/bin/env bash
# Make a headless Chromium available for the interop screenshot tests (Flower's workers page, /ui).
# Installs the Debian package `chromium` when no Chromium is found and we are root; otherwise says
# what to do and exits 0 (the screenshot test then skips, naming the reason).
# A Chromium elsewhere can be named with CHROMIUM=/path/to/chrome.
set -euo pipefail

log() { echo "chromium: $*"; }

find_chromium() {
    local name
    for name in "${CHROMIUM:-}" chromium chromium-browser google-chrome google-chrome-stable; do
        if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if path=$(find_chromium); then
    log "found $path"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    log "not installed and not root: the screenshot tests (Flower, /ui) will be skipped."
    log "install it with: sudo apt-get install chromium   (or set CHROMIUM=/path/to/chrome)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    log "not installed and no apt-get here: the screenshot tests (Flower, /ui) will be skipped."
    log "install Chromium with your package manager (or set CHROMIUM=/path/to/chrome)"
    exit 0
fi

log "installing the Debian package chromium (apt-get)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
path=$(find_chromium) || { echo "chromium: ERROR: installed, yet no chromium binary on PATH" >&2; exit 1; }
log "installed $path ($("$path" --version 2>/dev/null || echo 'version unknown'))"
