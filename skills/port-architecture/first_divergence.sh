#!/usr/bin/env bash
# Prints where `cargo xtask port <model_type>` stopped: the report's "Where it diverges"
# section and the head of the scaffold it wrote. Run from the repository root after a port.
set -euo pipefail
mt="${1:?usage: first_divergence.sh <model_type>}"
report="tests/fixtures/$mt/PORT_REPORT.md"
[[ -f "$report" ]] || { echo "no $report: run cargo xtask port $mt first" >&2; exit 2; }
sed -n '/^## Where it diverges/,/^## Gaps/p' "$report" | sed '$d'
sed -n '/^## Gaps/,/^## /p' "$report" | sed '$d'
scaffold="target/port/$mt/scaffold.rs"
if [[ -f "$scaffold" ]]; then
  echo "--- $scaffold (head)"
  head -n 30 "$scaffold"
fi
