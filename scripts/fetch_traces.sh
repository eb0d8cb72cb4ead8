#!/usr/bin/env bash
# Fetch the DeFT authors' public decoding-tree templates (github.com/LINs-lab/DeFT, MIT License) into ./traces
# (git-ignored; never committed). Used where ../shared/data/traces is absent: `make traces`.
#   traces/reasoning/*.json     <- dataset/generation/Reasoning/*.json (Graph-of-Thoughts trees)
#   traces/speculative/*.json   <- dataset/generation/Speculative_Decoding/APPS_tree_size*.json (Medusa records)
# The originals keep their prompt text; the importers ignore it.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_URL=https://github.com/LINs-lab/DeFT
COMMIT=1ed0071662a6b35b30a2515614417068c48298e6  # pinned: the commit that holds dataset/generation/
DEST=${TRACES_OUT:-traces}
SRC=dataset/generation

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch_git() {
  command -v git >/dev/null || return 1
  git -C "$tmp" init -q &&
    git -C "$tmp" remote add origin "$REPO_URL" &&
    git -C "$tmp" fetch -q --depth 1 origin "$COMMIT" &&
    git -C "$tmp" -c advice.detachedHead=false checkout -q FETCH_HEAD
}

fetch_tarball() {
  command -v curl >/dev/null || return 1
  rm -rf "${tmp:?}"/* "$tmp"/.git
  curl -fsSL "$REPO_URL/archive/$COMMIT.tar.gz" | tar -xz -C "$tmp" --strip-components=1
}

echo "fetching $REPO_URL at $COMMIT ..."
if ! fetch_git && ! fetch_tarball; then
  echo "fetch_traces: cannot download $REPO_URL at $COMMIT (needs git or curl and network access)" >&2
  exit 1
fi
for d in "$SRC/Reasoning" "$SRC/Speculative_Decoding"; do
  [ -d "$tmp/$d" ] || { echo "fetch_traces: $d missing at commit $COMMIT" >&2; exit 1; }
done

mkdir -p "$DEST/reasoning" "$DEST/speculative"
cp "$tmp/$SRC"/Reasoning/*.json "$DEST/reasoning/"
cp "$tmp/$SRC"/Speculative_Decoding/APPS_tree_size*.json "$DEST/speculative/"
[ -f "$tmp/LICENSE" ] && cp "$tmp/LICENSE" "$DEST/LICENSE"
printf 'source: %s\ncommit: %s\nfolder: %s\n' "$REPO_URL" "$COMMIT" "$SRC" > "$DEST/SOURCE"

echo "traces in $DEST/: $(ls "$DEST/reasoning" | wc -l) reasoning, $(ls "$DEST/speculative" | wc -l) speculative files"
echo
echo "These templates are the DeFT authors' data, used under the MIT License:"
if [ -f "$DEST/LICENSE" ]; then
  cat "$DEST/LICENSE"
else
  cat <<'EOF'
MIT License

Copyright (c) 2025 LINs Lab @ Westlake University

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of
the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
EOF
fi
