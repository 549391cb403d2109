#!/usr/bin/env bash
# Fetch SentEval's downstream/ tree and verify every file against data/senteval.sha256.
#
#   bash data/download_senteval.sh [DEST]        # DEST: folder that will hold downstream/ (default: data/senteval)
#
# SOURCE selects where the files come from (the provenance of each is in ../shared/data/originals/*/PROVENANCE.md):
#   SOURCE=github      (default) the SentEval-processed files at pinned commits of public repositories:
#                      robertoviegas/SimCSE (MR CR SUBJ MPQA TREC MRPC), leotmc/simcse (STS12-16, STS-B, SICK),
#                      PrincetonML/SIF (SST2), i.e. exactly what SentEval's get_transfer_data.bash produces.
#   SOURCE=simcse-tar  SimCSE's senteval.tar (the archive SimCSE/DiffCSE evaluate on).
#   SOURCE=/some/dir   copy from an existing tree (the folder holding downstream/, or downstream/ itself).
# Nothing is moved into DEST unless every file matches its SHA256.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SUMS="$HERE/senteval.sha256"
DEST="${1:-$HERE/senteval}"
SOURCE="${SOURCE:-github}"

ROBERTO="https://raw.githubusercontent.com/robertoviegas/SimCSE/a0d98a537ceffe5f728077dd0930c41171db2d16/SentEval/data/downstream"
LEOTMC="https://raw.githubusercontent.com/leotmc/simcse/e0b62fcef5dadeeef55aef3b640ab219860c201b/SentEval/data/downstream"
SIF="https://raw.githubusercontent.com/PrincetonML/SIF/84b5b4c1c1ca20b6af19fc78cae005a1818ec571/data"
SIMCSE_TAR="https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/senteval.tar"

die() { echo "download_senteval.sh: $*" >&2; exit 1; }
command -v sha256sum >/dev/null || die "sha256sum not found"
[ -f "$SUMS" ] || die "missing sums file $SUMS"

fetch() {  # fetch URL OUT
  if command -v curl >/dev/null; then curl -fsSL --retry 3 -o "$2" "$1"
  elif command -v wget >/dev/null; then wget -q -O "$2" "$1"
  else die "need curl or wget"; fi
}

url_for() {  # url_for downstream/REL -> the public URL of that file
  local rel="${1#downstream/}"
  case "$rel" in
    MR/*|CR/*|SUBJ/*|MPQA/*|TREC/*|MRPC/*) echo "$ROBERTO/$rel" ;;
    STS/*|SICK/*) echo "$LEOTMC/$rel" ;;
    SST/binary/*) echo "$SIF/${rel#SST/binary/}" ;;
    *) die "no source known for $rel" ;;
  esac
}

mkdir -p "$(dirname "$DEST")"
STAGE="$(mktemp -d "$(dirname "$DEST")/.senteval-download.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

case "$SOURCE" in
  github)
    while read -r _sum rel; do
      mkdir -p "$STAGE/$(dirname "$rel")"
      echo "fetch $rel"
      fetch "$(url_for "$rel")" "$STAGE/$rel" || die "download failed: $(url_for "$rel")"
    done < "$SUMS"
    ;;
  simcse-tar)
    echo "fetch $SIMCSE_TAR"
    fetch "$SIMCSE_TAR" "$STAGE/senteval.tar" || die "download failed: $SIMCSE_TAR"
    mkdir -p "$STAGE/x" && tar -xf "$STAGE/senteval.tar" -C "$STAGE/x"
    anchor="$(find "$STAGE/x" -path '*STS/STSBenchmark/sts-test.csv' | head -n1)"
    [ -n "$anchor" ] || die "senteval.tar has no STS/STSBenchmark/sts-test.csv"
    base="$(dirname "$(dirname "$(dirname "$anchor")")")"
    while read -r _sum rel; do
      src="$base/${rel#downstream/}"
      [ -f "$src" ] || die "senteval.tar lacks ${rel#downstream/}"
      mkdir -p "$STAGE/$(dirname "$rel")" && cp "$src" "$STAGE/$rel"
    done < "$SUMS"
    ;;
  *)
    [ -d "$SOURCE" ] || die "SOURCE must be github, simcse-tar or an existing folder, got '$SOURCE'"
    base="$SOURCE"; [ -d "$base/downstream" ] && base="$base/downstream"
    while read -r _sum rel; do
      src="$base/${rel#downstream/}"
      [ -f "$src" ] || die "missing in $SOURCE: ${rel#downstream/}"
      mkdir -p "$STAGE/$(dirname "$rel")" && cp "$src" "$STAGE/$rel"
    done < "$SUMS"
    ;;
esac

echo "verifying $(wc -l < "$SUMS") files against $SUMS"
if ! (cd "$STAGE" && sha256sum --quiet -c "$SUMS"); then
  die "checksum mismatch (files above); nothing was installed in $DEST"
fi
mkdir -p "$DEST"
rm -rf "$DEST/downstream.old"
[ -d "$DEST/downstream" ] && mv "$DEST/downstream" "$DEST/downstream.old"
mv "$STAGE/downstream" "$DEST/downstream"
rm -rf "$DEST/downstream.old"
echo "SentEval data ready: $DEST/downstream (point --senteval-data or SENTEVAL_DATA at $DEST)"
