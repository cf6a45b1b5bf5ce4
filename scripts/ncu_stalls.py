#!/usr/bin/env python3
"""The instructions a kernel's warps stall on most, from ncu's source page
(`ncu -i REPORT --page source --csv --print-source sass`): the SASS lines with the most
warp-stall samples, each with its share of all samples and its biggest stall reasons.

  python3 scripts/ncu_stalls.py pa-sass.csv [--top 40]
"""
import argparse
import csv
import sys


def num(v: str) -> float:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    lines = open(a.csv, errors="replace").read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"') and "Source" in l), None)
    if start is None:
        sys.exit(f"{a.csv}: no source table\n" + "\n".join(lines[:20]))
    rows = list(csv.DictReader(lines[start:]))
    cols = list(rows[0].keys()) if rows else []
    total_col = next((c for c in cols if c.startswith("Warp Stall Sampling (All")), None)
    if total_col is None:
        sys.exit(f"no stall-sampling column; columns: {cols}")
    reason_cols = [c for c in cols if c.lower().startswith("stall_") or "stall" in c.lower() and c != total_col
                   and "Not-issued" not in c]
    total = sum(num(r[total_col]) for r in rows) or 1.0
    # Per-reason totals over the kernel.
    sums = {c: sum(num(r[c]) for r in rows) for c in reason_cols}
    print(f"{len(rows)} SASS lines, {total:.0f} stall samples")
    print("by reason:", ", ".join(f"{c} {v / total:.1%}" for c, v in sorted(sums.items(), key=lambda kv: -kv[1]) if v))
    for r in sorted(rows, key=lambda r: -num(r[total_col]))[: a.top]:
        why = sorted(((num(r[c]), c) for c in reason_cols), reverse=True)[:3]
        why = ", ".join(f"{c} {v:.0f}" for v, c in why if v)
        print(f"{num(r[total_col]) / total:6.1%}  {r.get('Address', '')}  {r.get('Source', '')[:70]:70}  {why}")


if __name__ == "__main__":
    main()
