#!/usr/bin/env python3
"""Per-layer comparison of tprun against Hugging Face transformers on any Qwen2 checkpoint.

Runs transformers (float32, eager attention) with output_hidden_states=True, runs
`tprun -n N logits --hidden-states`, and prints `tprun compare`'s table for the hidden states
and for the logits. Needs torch, transformers and safetensors (never needed by CI).

    tools/compare_with_transformers.py --model DIR --text "Hello" -n 2 [--tprun target/release/tprun]
"""

import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face Qwen2 checkpoint directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="prompt text (tokenised without special tokens)")
    src.add_argument("--input-ids", help="comma-separated token ids")
    ap.add_argument("-n", "--nproc", type=int, default=2, help="tprun TP degree (default 2)")
    ap.add_argument("--tprun", default=os.environ.get("TPRUN", "target/release/tprun"),
                    help="path of the tprun binary (default target/release/tprun or $TPRUN)")
    ap.add_argument("--tol", type=float, default=None, help="fail when a tensor's max abs diff exceeds this")
    args = ap.parse_args()

    if args.input_ids:
        ids = [int(t) for t in args.input_ids.split(",")]
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
        ids = tok(args.text, add_special_tokens=False).input_ids

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    ref_h = {f"hidden_states.{i}": h[0].contiguous() for i, h in enumerate(out.hidden_states)}
    ref_l = {"logits": out.logits[0].float().contiguous()}

    with tempfile.TemporaryDirectory(prefix="tprun-compare-") as d:
        paths = {k: os.path.join(d, f"{k}.safetensors") for k in ("ref_h", "ref_l", "h", "l")}
        save_file(ref_h, paths["ref_h"])
        save_file(ref_l, paths["ref_l"])
        run = [args.tprun, "-n", str(args.nproc), "logits", "--model", args.model,
               "--input-ids", ",".join(map(str, ids)), "--out", paths["l"],
               "--hidden-states", paths["h"]]
        subprocess.run(run, check=True, stdout=subprocess.DEVNULL)
        tol = ["--tol", str(args.tol)] if args.tol is not None else []
        print(f"# tprun TP {args.nproc} vs transformers {model.config.transformers_version or ''}"
              f" float32, {len(ids)} tokens")
        codes = [subprocess.run([args.tprun, "compare", paths[a], paths[b], *tol]).returncode
                 for a, b in (("h", "ref_h"), ("l", "ref_l"))]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
