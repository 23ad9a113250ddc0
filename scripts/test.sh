#!/usr/bin/env bash
# The test command: fetches the registry test data (once; cached), then runs every test.
# Real data beside the project (../shared/data) is used when present; set
# FLUOROPOSE_REQUIRE_DATA=1 to make its absence a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-data.sh
# Every test binary runs even after one fails, so that a red CI names every failing test.
exec cargo test --locked --no-fail-fast "$@"
