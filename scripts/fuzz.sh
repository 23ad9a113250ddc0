#!/usr/bin/env bash
# Runs each loader's fuzz target for a bounded time (default 60 s each) with cargo-fuzz.
# cargo-fuzz needs nightly flags; the one toolchain here is stable, so RUSTC_BOOTSTRAP=1 lets it
# pass them, and the sanitizer is off (`-s none`: coverage-guided, panics and aborts caught).
# Seeds come from our own writers and from data/registry (scripts/fetch-data.sh).
# Usage: scripts/fuzz.sh [seconds-per-target]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
mkdir -p fuzz/corpus/nifti fuzz/corpus/dicom fuzz/corpus/landmarks
cp -n data/registry/nibabel/tests/data/*.nii* fuzz/corpus/nifti/ 2>/dev/null || true
for f in data/registry/pydicom/data/test_files/*.dcm; do
  [ "$(stat -c %s "$f")" -lt 200000 ] && cp -n "$f" fuzz/corpus/dicom/ || true
done
cp -n tests/data/landmarks/* fuzz/corpus/landmarks/ 2>/dev/null || true
for t in nifti dicom landmarks; do
  echo "== fuzz $t for ${secs}s"
  cargo fuzz run -s none "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=4096 -timeout=20 2>&1 \
    | grep -E "^#[0-9]+.*(DONE|pulse)|Done [0-9]+ runs|ERROR|panicked|crash-" | tail -n 3
done
