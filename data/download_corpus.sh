#!/usr/bin/env bash
# Fetch SimCSE's unsupervised training file wiki1m_for_simcse.txt (1M Wikipedia sentences, ~120 MB)
# into $DIFFCSE_DATA_DIR/corpus/ (default: data/corpus/) and verify it.
#
# No published SHA256 exists for the whole file, so we verify what we can: its first 1,280,000
# bytes must hash to the value below (the prefix checked into the shared benchmark data), and the
# file must have 1,000,000 lines. The full file's hash is printed so you can pin it.
set -euo pipefail
root="${DIFFCSE_DATA_DIR:-$(cd "$(dirname "$0")" && pwd)}"
dest="$root/corpus"
url="https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/wiki1m_for_simcse.txt"
prefix_sha="e8b96b77ffcd3226cbddb6e9eb1185bcefee7118d6281792970a5e7a31432c42"
mkdir -p "$dest"
tmp="$(mktemp "$dest/.wiki1m.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
echo "downloading $url"
curl -fL --retry 3 -o "$tmp" "$url"
got="$(head -c 1280000 "$tmp" | sha256sum | cut -d' ' -f1)"
if [ "$got" != "$prefix_sha" ]; then
  echo "error: the first 1,280,000 bytes hash to $got, expected $prefix_sha" >&2
  exit 1
fi
lines="$(wc -l < "$tmp")"
if [ "$lines" -ne 1000000 ]; then
  echo "error: expected 1000000 lines, got $lines" >&2
  exit 1
fi
mv "$tmp" "$dest/wiki1m_for_simcse.txt"
trap - EXIT
echo "ok: $dest/wiki1m_for_simcse.txt sha256 $(sha256sum "$dest/wiki1m_for_simcse.txt" | cut -d' ' -f1)"
