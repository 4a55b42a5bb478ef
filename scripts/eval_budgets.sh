#!/usr/bin/env bash
# Evaluates a .bitstack file at the given budgets (bytes) and prints
# "budget loaded_bytes blocks ppl" rows.
# usage: scripts/eval_budgets.sh FILE TEXT WINDOWS BUDGET...   (WINDOWS: a number or "all")
set -euo pipefail
file=$1 text=$2 windows=$3; shift 3
bin=${BITSTACK:-target/release/bitstack}
extra=()
if [ "$windows" != all ]; then extra=(--windows "$windows"); fi
for budget in "$@"; do
  got=$("$bin" eval "$file" --text "$text" --budget "$budget" --json "${extra[@]}")
  python3 -c "
import json,sys
d=json.loads(sys.argv[1])
print(sys.argv[2], d['memory_bytes'], d['blocks'], '%.4f' % d['ppl'])
" "$got" "$budget"
done
