#!/usr/bin/env bash
# Render a liverseg report in headless Chromium, check that every image
# loads, and save a full-page screenshot.
#   usage: render_report.sh REPORT.html SCREENSHOT.png
# Exit 0: all images loaded; 1: a broken image or none; 2: usage or no Chromium.
set -euo pipefail
html=${1:?usage: render_report.sh REPORT.html SCREENSHOT.png}
png=${2:?usage: render_report.sh REPORT.html SCREENSHOT.png}
[ -f "$html" ] || { echo "render_report: $html: no such file" >&2; exit 2; }
html=$(realpath "$html")
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "render_report: Chromium is not installed (Debian: apt-get install chromium)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A copy of the report with a probe that records, after load, how many images
# there are and which failed to decode. The report itself is left untouched.
probe="<script>window.addEventListener('load',()=>{const i=[...document.images];const bad=i.filter(x=>!(x.complete&&x.naturalWidth>0)).map(x=>x.alt);document.body.insertAdjacentHTML('beforeend','<pre id=probe>images='+i.length+' broken='+bad.length+' ['+bad.join(' | ')+']</pre>');});</script>"
# (Appended after </html>: browsers still run it, and no quoting of the report is needed.)
{ cat "$html"; printf '%s\n' "$probe"; } > "$work/report.html"
flags=(--headless --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars --no-first-run --user-data-dir="$work/profile" --virtual-time-budget=10000)
dom=$(timeout 120 "$browser" "${flags[@]}" --dump-dom "file://$work/report.html" 2>/dev/null)
line=$(grep -o 'images=[0-9]* broken=[0-9]* \[[^]]*\]' <<<"$dom" || true)
[ -n "$line" ] || { echo "render_report: $html: the page did not finish loading in Chromium" >&2; exit 1; }
timeout 120 "$browser" "${flags[@]}" --window-size=1200,6000 --screenshot="$png" "file://$html" >/dev/null 2>&1 || true
echo "$html: $line; screenshot $png"
n=$(sed 's/images=\([0-9]*\).*/\1/' <<<"$line"); b=$(sed 's/.*broken=\([0-9]*\).*/\1/' <<<"$line")
[ "$n" -gt 0 ] && [ "$b" -eq 0 ]
