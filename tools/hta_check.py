"""Loads a `tprun --trace DIR/` folder with Holistic Trace Analysis and prints its temporal
breakdown and communication/computation overlap (not in CI: HTA pulls pandas/plotly).
Usage: /tmp/hta/bin/python tools/hta_check.py DIR"""
import sys

from hta.trace_analysis import TraceAnalysis

t = TraceAnalysis(trace_dir=sys.argv[1])
print("temporal breakdown:")
print(t.get_temporal_breakdown(visualize=False).to_string())
print("communication/computation overlap:")
print(t.get_comm_comp_overlap(visualize=False).to_string())
