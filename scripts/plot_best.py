#!/usr/bin/env python3
"""Memory → perplexity plot (SVG) and table of best mode against the reference results.

usage: scripts/plot_best.py MODEL BEST_TXT OUT_SVG [NAIVE_TXT]

BEST_TXT / NAIVE_TXT: rows "budget loaded_bytes blocks ppl" as printed by
scripts/eval_budgets.sh with WINDOWS=64 (test64). The reference curves, GPTQ/RTN baselines and
llama.cpp points are read from ../shared/reference (test64 values); nothing is copied into
the measured files.
"""
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
REF = os.path.join(ROOT, "..", "shared", "reference")


def rows(path):
    out = []
    for line in open(path):
        parts = line.split()
        if len(parts) == 4:
            out.append((int(parts[1]) / 1e6, float(parts[3])))
    return sorted(set(out))


def main():
    model, best_txt, svg = sys.argv[1:4]
    naive_txt = sys.argv[4] if len(sys.argv) > 4 else None
    ref = json.load(open(os.path.join(REF, f"bitstack_reference_{model}.json")))
    series = []  # (label, colour, points, line?)
    series.append(("bitstack best mode", "#d62728", rows(best_txt), True))
    if naive_txt:
        series.append(("naive plane stack (ours, --alpha 0 --order levels)", "#ff9896", rows(naive_txt), True))
    for curve, colour in zip(ref["bitstack"], ["#1f77b4", "#6baed6", "#9ecae1"]):
        pts = [(c["memory_bytes"] / 1e6, c["ppl_test64"]) for c in curve["curve"]]
        series.append((f"reference BitStack k={curve['k']}", colour, pts, True))
    gptq = [(b["memory_bytes"] / 1e6, b["ppl_test64"]) for b in ref["baselines"] if b["method"].startswith("GPTQ")]
    series.append(("GPTQ g128 (w2/w3/w4)", "#2ca02c", gptq, False))
    lc_path = os.path.join(REF, f"llamacpp_{model}.json")
    if os.path.exists(lc_path):
        lc = json.load(open(lc_path))
        pts = [(p["tensor_bytes"] / 1e6, p["ppl_test64"]) for p in lc["points"] if p["quant"] not in ("f16", "Q8_0")]
        series.append(("llama.cpp K-quants", "#9467bd", pts, False))
    original = ref["original"]["ppl_test64"]

    all_pts = [p for _, _, pts, _ in series for p in pts]
    x_max = max(x for x, _ in all_pts) * 1.02
    y_min = original * 0.99
    y_max = original * 1.25
    w, h, left, right, top, bottom = 900, 560, 70, 330, 30, 50
    pw, ph = w - left - right, h - top - bottom

    def sx(x):
        return left + pw * x / x_max

    def sy(y):
        y = min(max(y, y_min), y_max)
        return top + ph * (1 - (y - y_min) / (y_max - y_min))

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{left}" y="18" font-size="14">{model}: perplexity (test64) vs memory — points above {y_max:.1f} drawn at the top edge</text>']
    for i in range(6):
        y = y_min + (y_max - y_min) * i / 5
        o.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        o.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    step = 5 if x_max > 30 else 1
    x = 0
    while x <= x_max:
        o.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>')
        o.append(f'<text x="{sx(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{x:g}</text>')
        x += step
    o.append(f'<text x="{left + pw / 2}" y="{h - 10}" text-anchor="middle">memory (MB, all tensor bytes)</text>')
    o.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(original):.1f}" y2="{sy(original):.1f}" stroke="black" stroke-dasharray="4 3"/>')
    o.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>')
    for label, colour, pts, line in series:
        if line and len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            o.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            o.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{colour}"/>')
    ly = top + 10
    for label, colour, _, _ in series + [("original model", "black", [], False)]:
        o.append(f'<rect x="{left + pw + 15}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>')
        o.append(f'<text x="{left + pw + 32}" y="{ly + 1}">{label}</text>')
        ly += 20
    o.append("</svg>")
    open(svg, "w").write("\n".join(o))

    # Table: best mode at each comparison point (nearest measured budget at or below it).
    best = rows(best_txt)
    print(f"| memory (MB) | competitor | its ppl (test64) | best mode loaded (MB) | best mode ppl (test64) |")
    print("|---|---|---|---|---|")
    comps = [(f"reference k={c['k']}", p["memory_bytes"] / 1e6, p["ppl_test64"]) for c in ref["bitstack"] for p in c["curve"]]
    comps += [(b["method"], b["memory_bytes"] / 1e6, b["ppl_test64"]) for b in ref["baselines"] if b["method"].startswith("GPTQ")]
    if os.path.exists(lc_path):
        comps += [(f"llama.cpp {p['quant']}", p["tensor_bytes"] / 1e6, p["ppl_test64"]) for p in lc["points"] if p["quant"] not in ("f16", "Q8_0")]
    for name, mb, ppl in sorted(comps, key=lambda c: c[1]):
        cands = [b for b in best if b[0] <= mb + 1e-9]
        if not cands:
            continue
        bx, by = max(cands)
        mark = "✓" if by < ppl else "✗"
        print(f"| {mb:.2f} | {name} | {ppl:.3f} | {bx:.2f} | {by:.3f} {mark} |")


if __name__ == "__main__":
    main()
