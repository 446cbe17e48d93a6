#!/usr/bin/env bash
# Render a `layerprune report` page in headless Chromium (Debian package `chromium`) and save a PNG.
# Usage: bash bench/render_report.sh GRID_DIR [OUT.png]
set -euo pipefail
DIR=$(cd "$1" && pwd); PNG=${2:-$DIR/report_screenshot.png}
layerprune report "$DIR" --quiet >/dev/null
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1200,1500 \
  --screenshot="$PNG" "file://$DIR/report.html" 2>/dev/null
test -s "$PNG" && echo "wrote $PNG"
