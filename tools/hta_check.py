"""Loads a `tprun --trace DIR/` folder's per-rank traces (DIR/ranks/) with Holistic Trace Analysis
and prints its temporal breakdown and communication/computation overlap; given a tprun binary,
also `tprun analyze`'s compute and collective time per rank from the same run, to compare
(not in CI: HTA pulls pandas/plotly).
Usage: /tmp/hta/bin/python tools/hta_check.py DIR [TPRUN]"""
import json
import os
import subprocess
import sys

from hta.trace_analysis import TraceAnalysis

# DIR/ranks holds only the per-rank files: HTA takes every *.json of its folder for a rank.
d = sys.argv[1]
ranks = os.path.join(d, "ranks")
t = TraceAnalysis(trace_dir=ranks if os.path.isdir(ranks) else d)
print("temporal breakdown:")
print(t.get_temporal_breakdown(visualize=False).to_string())
print("communication/computation overlap:")
print(t.get_comm_comp_overlap(visualize=False).to_string())
if len(sys.argv) > 2:
    out = subprocess.run([sys.argv[2], "analyze", "--json", d], check=True, capture_output=True)
    print("tprun analyze, same trace:")
    print("rank  compute(us)  comm(us)")
    for r in json.loads(out.stdout)["ranks"]:
        print(f"{r['rank']:>4}  {r['compute_us']:>11.1f}  {r['comm_us']:>8.1f}")
