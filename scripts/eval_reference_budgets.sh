#!/usr/bin/env bash
# Evaluates a .bitstack file at every memory_bytes of a reference curve and prints
# "memory_bytes loaded_bytes blocks ppl reference_ppl ratio" rows.
# usage: scripts/eval_reference_budgets.sh FILE REFERENCE_JSON K TEXT [WINDOWS]
#   WINDOWS: 64 compares with ppl_test64, "all" with ppl_test.
set -euo pipefail
file=$1 ref=$2 k=$3 text=$4 windows=${5:-all}
bin=${BITSTACK:-target/release/bitstack}
key=ppl_test; extra=()
if [ "$windows" != all ]; then key=ppl_test64; extra=(--windows "$windows"); fi
python3 -c "
import json
r=[x for x in json.load(open('$ref'))['bitstack'] if x['k']==$k][0]
for c in r['curve']: print(c['memory_bytes'], c['$key'])
" | while read -r budget want; do
  got=$("$bin" eval "$file" --text "$text" --budget "$budget" --json "${extra[@]}")
  python3 -c "
import json,sys
d=json.loads(sys.argv[1]); want=float(sys.argv[3])
print(sys.argv[2], d['memory_bytes'], d['blocks'], '%.4f' % d['ppl'], '%.4f' % want, '%.4f' % (d['ppl']/want))
" "$got" "$budget" "$want"
done
