#!/usr/bin/env python3
"""How much of a bitstack stack order agrees with the reference `order`.

usage: compare_order.py <inspect --json --order output> <reference json> <k>

Prints: the fraction of stack positions holding the same block, and for each prefix length
of the reference curve the overlap of the two prefixes (same blocks loaded, in any order).
"""
import json
import sys

ours = json.load(open(sys.argv[1]))
ref_all = json.load(open(sys.argv[2]))
k = int(sys.argv[3])
ref = next(r for r in ref_all["bitstack"] if r["k"] == k)
n_base = ours["mandatory_blocks"]
mine = [(name.removesuffix(".weight"), b) for name, b in ours["order"][n_base:]]
counts = {}
theirs = []
for name in ref["order"]:
    counts[name] = counts.get(name, 0) + 1
    theirs.append((name, counts[name]))
same = sum(1 for a, b in zip(mine, theirs) if a == b)
print(f"positions with the same block: {same}/{len(theirs)} ({same / len(theirs):.1%})")
levels_same = 0
for point in ref["curve"]:
    n = point["blocks_loaded"] - n_base
    if n <= 0:
        continue
    overlap = len(set(mine[:n]) & set(theirs[:n]))
    print(f"prefix {point['blocks_loaded']:4d} blocks: {overlap}/{n} shared ({overlap / n:.1%})")
