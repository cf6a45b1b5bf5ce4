#!/usr/bin/env python3
"""Sums an ncu CSV (`ncu --metrics gpu__time_duration.sum --csv --print-units base`) by
kernel name: total time, launches and share, biggest first. `--steps N` divides by the
steps the profiled run took, for a per-step view.

  python3 scripts/ncu_summary.py train-ncu.csv --steps 2 [--top 30]
"""
import argparse
import collections
import csv
import re
import sys


def short(name: str) -> str:
    # Template arguments and parameter lists make every instance distinct; keep the name.
    name = re.sub(r"\(.*", "", name)
    return re.sub(r"<.*", "", name).replace("void ", "").strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    lines = [l for l in open(a.csv) if l.startswith('"')]
    total = collections.Counter()
    count = collections.Counter()
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        k = short(row["Kernel Name"])
        total[k] += float(row["Metric Value"].replace(",", ""))
        count[k] += 1
    all_ns = sum(total.values())
    if not all_ns:
        sys.exit(f"{a.csv}: no gpu__time_duration rows")
    print(f"{sum(count.values()) / a.steps:.0f} kernels, {all_ns / a.steps / 1e6:.2f} ms of GPU time per step")
    print("| kernel | launches/step | ms/step | share |")
    print("| --- | --- | --- | --- |")
    for k, ns in total.most_common(a.top):
        print(f"| {k} | {count[k] / a.steps:.0f} | {ns / a.steps / 1e6:.3f} | {100 * ns / all_ns:.1f} % |")


if __name__ == "__main__":
    main()
