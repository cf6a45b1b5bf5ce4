#!/usr/bin/env bash
# Saves a PNG of the operators' page (GET /) of a running crosskv server, rendered by
# headless Chromium after 5 s of virtual time (so the first refreshes have landed).
#
#   scripts/operators-page-screenshot.sh [URL] [OUT.png]
#
# URL defaults to http://127.0.0.1:8000/, OUT to operators-page.png. CHROMIUM names the
# browser binary (default: chromium, else chromium-browser, else google-chrome). With
# --api-key the page cannot be given the key here, so it shows the 401 notice instead of
# /v1/kv's figures.
set -euo pipefail

url=${1:-http://127.0.0.1:8000/}
out=${2:-operators-page.png}
browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
    for b in chromium chromium-browser google-chrome; do
        if command -v "$b" >/dev/null; then browser=$b; break; fi
    done
fi
[[ -n $browser ]] || { echo "no Chromium found (apt-get install chromium, or set CHROMIUM)" >&2; exit 1; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless=new --disable-gpu --no-sandbox --hide-scrollbars \
    --user-data-dir="$profile" --virtual-time-budget=5000 --window-size=1000,1100 \
    --screenshot="$(realpath -m "$out")" "$url" 2>/dev/null
[[ -s $out ]] || { echo "no screenshot written to $out" >&2; exit 1; }
echo "$out"
