#!/usr/bin/env bash
# Render an HTML report (leukotree report / evaluate / cv) to PNG with headless Chromium.
#   scripts/screenshot.sh report.html report.png [WIDTHxHEIGHT]
# Needs Debian's chromium (apt-get install chromium). Works offline: reports are
# self-contained.
set -euo pipefail
html=$(realpath "$1"); png=$2; size=${3:-1100,1500}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size="${size/x/,}" --screenshot="$png" \
  "file://$html" 2>/dev/null
echo "wrote $png"
