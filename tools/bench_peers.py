#!/usr/bin/env python3
"""Side-by-side CPU benchmark of tprun's peers (issue 6): llama.cpp and transformers.

The case: Qwen2.5-0.5B shapes (vocab 151936, hidden 896, intermediate 4864, 24 layers, 14 heads,
2 KV heads, head_dim 64, tied embeddings, rope_theta 1e6, rms eps 1e-6), RANDOM weights (normal,
std 0.02; nothing is downloaded), a 128-token prompt of random ids (the same ids for every peer),
32 greedy decode steps, 2 threads, best of --rounds rounds. Reported:
prefill tok/s = 128 / prefill time, decode tok/s = 32 / decode time.

Systems (--only takes a comma list of these names):
  llama-bf16        llama.cpp (llama-cpp-python) on a BF16 GGUF
  llama-f16         llama.cpp on an F16 GGUF
  hf-bf16           transformers + torch, bf16 weights
  hf-f32            transformers + torch, float32 weights (upcast from the same bf16 checkpoint)
  tprun-n2          tprun -n T bench --preset qwen2.5-0.5b        (needs --tprun)
  tprun-n1          tprun -n 1 bench --preset ... with T threads  (needs --tprun)
  tprun-n2-bf16dot  tprun -n T bench --preset ... --bf16-dot      (needs --tprun)
  tprun-n2-model    tprun -n T bench --model MODEL_DIR/qwen05-random (needs --tprun; the same
                    random weights as the peers, loaded from safetensors)

How each is timed (wall clock, time.perf_counter, in the process that runs the model):
  * Every peer runs in its own worker process (this script with `_worker`), started once: it loads
    its model, runs ONE warm-up round, then runs one measured round per request. Rounds are
    interleaved: round r runs every system once (the order rotates each round) before round r+1,
    so slow phases of a shared machine hit all systems alike. Workers are idle (blocked on a pipe
    read) while the others run.
  * llama.cpp: Llama(path, n_threads=T, n_threads_batch=T, n_ctx=512, n_batch=512, verbose=False;
    everything else default: mmap, n_ubatch 512, flash_attn off, f16 KV cache). A round: reset()
    and clear the KV cache; prefill = llm.eval(128 ids) + argmax of the last logits; decode = 32
    x (llm.eval([tok]) + argmax of its logits). Argmax is numpy over llama_get_logits_ith(-1).
    llama.cpp's own counters (llama_perf_context, reset before each round) are printed beside:
    t_p_eval (the batched prompt decode) and t_eval (single-token decodes), without Python.
  * transformers: AutoModelForCausalLM (attn_implementation "sdpa"), model.eval(),
    torch.inference_mode(), torch.set_num_threads(T). Prefill = model(ids, use_cache=True,
    logits_to_keep=1) + argmax; decode = 32 x (model(tok, cache=cache, use_cache=True) + argmax)
    (`cache` is transformers 5's name for past_key_values). A fresh DynamicCache per round.
  * tprun: one `tprun ... bench --rounds 2 --json` process per round (tprun's preset builds its
    weights in memory at start, so a process cannot wait between rounds); its first in-process
    round is the warm-up and the second is taken (timings.*_tok_s_all[-1]). tprun times its own
    rounds the same way: prefill = forward of the prompt + argmax, decode = 32 x (forward + argmax),
    every rank barrier-synchronised before the round. --preset weights are tprun's own uniform
    random ones (same shapes, bf16), not the checkpoint; tprun-n2-model loads the checkpoint.
    tprun bench makes its own random prompt (128 ids), so its greedy ids are not comparable.
  * The peers' greedy ids are compared (same weights, same prompt): the table is followed by how
    many of the 32 agree with hf-f32's, a check that the GGUFs hold the same model.

Setup (see tools/README.md): a venv with torch, transformers, numpy, safetensors, gguf and
llama-cpp-python built from source with -march=native, then

    tools/bench_peers.py models --model-dir /tmp/peers --llama-cpp-src DIR   # ~3 GB, once
    tools/bench_peers.py run --model-dir /tmp/peers --rounds 4 --tprun target/release/tprun \\
        --out /tmp/peers/bench.json

DIR is the llama.cpp source tree whose convert_hf_to_gguf.py writes the GGUFs (vendor/llama.cpp
inside the llama-cpp-python sdist). Its BPE pre-tokenizer check does not know this repo's test
tokenizer, so `models` runs it with get_vocab_base_pre answering "qwen2" (the tokenizer uses
Qwen2's split regex) and Qwen2's set_vocab going straight to its GPT-2 BPE branch (the one it falls
back to without a sentencepiece model); nothing else of the converter is changed.

`run` prints a markdown table (best, and the range over rounds) and, with --out, writes every raw
number to a JSON file. It is never run by CI.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FIXTURE = ROOT / "tests" / "fixtures" / "tiny-hub-bf16-tied"

HF_NAME = "qwen05-random"
GGUF_NAMES = {"bf16": "qwen05-random-bf16.gguf", "f16": "qwen05-random-f16.gguf"}

PEERS = ["llama-bf16", "llama-f16", "hf-bf16", "hf-f32"]
TPRUN_SYSTEMS = ["tprun-n2", "tprun-n1", "tprun-n2-bf16dot", "tprun-n2-model"]
LABELS = {
    "llama-bf16": "llama.cpp BF16 GGUF",
    "llama-f16": "llama.cpp F16 GGUF",
    "hf-bf16": "transformers + torch bf16",
    "hf-f32": "transformers + torch f32",
    "tprun-n2": "tprun -n {T} (--preset, 1 thread per rank)",
    "tprun-n1": "tprun -n 1 ({T} threads, --preset)",
    "tprun-n2-bf16dot": "tprun -n {T} --bf16-dot (--preset)",
    "tprun-n2-model": "tprun -n {T} (--model, same weights as the peers)",
}
# The issue's numbers (their machine: 2 threads, best of 4), printed beside ours.
ISSUE = {
    "llama-bf16": (609, 45.2),
    "llama-f16": (440, 47.4),
    "hf-bf16": (670, 35.7),
    "hf-f32": (198, 8.5),
}

# The case; tools/bench_quiet.py sets these (and its workers inherit them) for the long cases.
PROMPT_LEN = int(os.environ.get("BENCH_PROMPT_LEN", "128"))
NEW_TOKENS = int(os.environ.get("BENCH_NEW_TOKENS", "32"))
PROMPT_SEED = 1234

# Qwen2.5-0.5B, as in its config.json (with this repo's test tokenizer's special-token ids).
QWEN05 = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=True,
    max_window_layers=21,
)


def prompt_ids(vocab: int) -> list[int]:
    """The prompt every peer gets: PROMPT_LEN seeded random ids in [0, vocab)."""
    import numpy as np

    return np.random.RandomState(PROMPT_SEED).randint(0, vocab, size=PROMPT_LEN).tolist()


# ---------------------------------------------------------------------------------------------
# models: the random checkpoint and its GGUFs
# ---------------------------------------------------------------------------------------------


def make_models(args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(args.model_dir)
    hf = out / HF_NAME
    out.mkdir(parents=True, exist_ok=True)
    if (hf / "model.safetensors").exists() and not args.force:
        print(f"{hf}: exists (use --force to remake)")
    else:
        c = dict(QWEN05)
        theta = c.pop("rope_theta")
        config = Qwen2Config(
            **c,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
            use_sliding_window=False,
            sliding_window=None,
            attention_dropout=0.0,
            initializer_range=0.02,
            bos_token_id=387,  # <|endoftext|> of tests/fixtures' tokenizer
            eos_token_id=389,  # <|im_end|>
            use_cache=True,
        )
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        model = Qwen2ForCausalLM(config)  # normal(0, 0.02) linears and embedding, zero biases
        with torch.no_grad():
            # Small nonzero q/k/v biases and norm weights near 1, so those paths carry numbers.
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.02)
                elif "norm" in name:
                    p.normal_(1.0, 0.05)
        model = model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(hf, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER_FIXTURE / f, hf / f)
        print(f"{hf}: written in {time.perf_counter() - t0:.1f} s")
        # The checkpoint must give finite logits.
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids(config.vocab_size)])
            logits = model(ids).logits.float()
        if not torch.isfinite(logits).all():
            sys.exit(f"{hf}: the random model gives non-finite logits")
        print(f"  logits std {logits.std().item():.3f}, finite")
        del model

    if args.llama_cpp_src is None:
        print("no --llama-cpp-src: GGUFs not made")
        return
    src = Path(args.llama_cpp_src).resolve()
    if not (src / "convert_hf_to_gguf.py").exists():
        sys.exit(f"--llama-cpp-src {src}: no convert_hf_to_gguf.py there")
    for outtype, name in GGUF_NAMES.items():
        path = out / name
        if path.exists() and not args.force:
            print(f"{path}: exists (use --force to remake)")
            continue
        # The converter's pre-tokenizer check hashes a test string's ids and knows only real
        # models' tokenizers; ours uses Qwen2's split regex, so it is told "qwen2" directly.
        # Its Qwen2 set_vocab tries sentencepiece first (an import this venv need not have) and
        # falls back to the GPT-2 BPE path, which is the one for tokenizer.json: go there directly.
        code = (
            "import sys, runpy\n"
            f"sys.path[:0] = [{str(src)!r}, {str(src / 'gguf-py')!r}]\n"
            "import conversion.base as b\n"
            "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
            "import conversion.qwen as q\n"
            "q.Qwen2Model.set_vocab = lambda self: self._set_vocab_gpt2()\n"
            f"sys.argv = ['convert_hf_to_gguf.py', {str(hf)!r}, '--outtype', {outtype!r},"
            f" '--outfile', {str(path)!r}]\n"
            f"runpy.run_path({str(src / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
        )
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True)
        if r.returncode != 0 or not path.exists():
            sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
            sys.exit(f"convert_hf_to_gguf.py --outtype {outtype}: failed (exit {r.returncode})")
        print(f"{path}: written in {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------------------------------------
# workers: one process per peer, one round per request
# ---------------------------------------------------------------------------------------------


class LlamaPeer:
    def __init__(self, path: Path, threads: int):
        import llama_cpp
        import numpy as np

        self.lc, self.np = llama_cpp, np
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=max(512, PROMPT_LEN + NEW_TOKENS + 8),
            n_batch=512,
            verbose=False,
        )
        self.ctx = self.llm._ctx.ctx
        self.n_vocab = self.llm.n_vocab()
        self.info = {
            "llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "n_ctx": self.llm.n_ctx(),
            "n_batch": self.llm.n_batch,
            "n_ubatch": self.llm.context_params.n_ubatch,
            "flash_attn_type": int(self.llm.context_params.flash_attn_type),
            "n_vocab": self.n_vocab,
            "gguf": str(path),
        }

    def argmax(self) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, -1)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def round(self, prompt: list[int], steps: int) -> dict:
        llm, lc = self.llm, self.lc
        llm.reset()
        llm._ctx.kv_cache_clear()
        lc.llama_perf_context_reset(self.ctx)
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self.argmax()
        t1 = time.perf_counter()
        out = []
        for _ in range(steps):
            out.append(tok)
            llm.eval([tok])
            tok = self.argmax()
        t2 = time.perf_counter()
        perf = lc.llama_perf_context(self.ctx)
        return {
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
            "output_ids": out,
            "llama_perf": {
                "t_p_eval_ms": perf.t_p_eval_ms,
                "n_p_eval": perf.n_p_eval,
                "t_eval_ms": perf.t_eval_ms,
                "n_eval": perf.n_eval,
            },
        }


class HfPeer:
    def __init__(self, path: Path, threads: int, dtype: str):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        td = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=td, attn_implementation="sdpa")
        self.model.eval()
        # transformers 5 renamed past_key_values (argument and output) to cache.
        self.cache_kw = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )
        self.info = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "dtype": str(next(self.model.parameters()).dtype),
            "attn_implementation": self.model.config._attn_implementation,
            "checkpoint": str(path),
        }

    def round(self, prompt: list[int], steps: int) -> dict:
        torch, model = self.torch, self.model
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            o = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tok = int(o.logits[0, -1].argmax())
            cache = o[self.cache_kw]
            t1 = time.perf_counter()
            out = []
            for _ in range(steps):
                out.append(tok)
                o = model(input_ids=torch.tensor([[tok]]), use_cache=True, **{self.cache_kw: cache})
                cache = o[self.cache_kw]
                tok = int(o.logits[0, -1].argmax())
            t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "output_ids": out}


def worker(args: argparse.Namespace) -> None:
    """Loads one peer, warms it up, then answers each 'round' line on stdin with a JSON line."""
    d = Path(args.model_dir)
    name = args.system
    if name == "llama-bf16":
        peer = LlamaPeer(d / GGUF_NAMES["bf16"], args.threads)
    elif name == "llama-f16":
        peer = LlamaPeer(d / GGUF_NAMES["f16"], args.threads)
    elif name == "hf-bf16":
        peer = HfPeer(d / HF_NAME, args.threads, "bf16")
    elif name == "hf-f32":
        peer = HfPeer(d / HF_NAME, args.threads, "f32")
    else:
        sys.exit(f"unknown system {name}")
    prompt = prompt_ids(QWEN05["vocab_size"])
    warm = peer.round(prompt, NEW_TOKENS)
    print(json.dumps({"ready": True, "info": peer.info, "warmup": warm}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        print(json.dumps(peer.round(prompt, NEW_TOKENS)), flush=True)


class Worker:
    def __init__(self, name: str, args: argparse.Namespace):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, __file__, "_worker", "--system", name,
               "--model-dir", args.model_dir, "--threads", str(args.threads)]
        self.name = name
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                  text=True)
        first = self.read()
        self.info, self.warmup = first["info"], first["warmup"]

    def read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            code = self.p.wait()
            raise RuntimeError(f"{self.name}: worker exited ({code}) without an answer")
        return json.loads(line)

    def round(self) -> dict:
        self.p.stdin.write("round\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Tprun:
    """One tprun bench process per round; its second (post warm-up) round is taken."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name = name
        t = args.threads
        n = 1 if name == "tprun-n1" else t
        cmd = [args.tprun, "-n", str(n), "bench"]
        if name == "tprun-n2-model":
            cmd += ["--model", str(Path(args.model_dir) / HF_NAME)]
        else:
            cmd += ["--preset", "qwen2.5-0.5b"]
        cmd += ["--prompt-len", str(PROMPT_LEN), "--new-tokens", str(NEW_TOKENS),
                "--rounds", "2", "--json"]
        if name == "tprun-n2-bf16dot":
            cmd.append("--bf16-dot")
        if os.environ.get("BENCH_TPRUN_ROOFLINE") == "1":
            cmd.append("--roofline")
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)  # the launcher gives each rank its cores' worth
        if n == 1:
            env["OMP_NUM_THREADS"] = str(t)
        self.cmd, self.env = cmd, env
        self.info = {"command": " ".join(cmd), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS")}
        self.warmup = None

    def round(self) -> dict:
        r = subprocess.run(self.cmd, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{self.info['command']}: exit {r.returncode}: {r.stderr[-2000:]}")
        # The launcher prefixes rank lines; the JSON object is rank 0's line.
        j = None
        for line in r.stdout.splitlines():
            s = line[line.find("{"):] if "{" in line else ""
            if s:
                try:
                    j = json.loads(s)
                except json.JSONDecodeError:
                    continue
        if j is None:
            raise RuntimeError(f"{self.info['command']}: no JSON in its output:\n{r.stdout[-2000:]}")
        tm = j["timings"]
        p, d = tm["prefill_tok_s_all"][-1], tm["decode_tok_s_all"][-1]
        return {
            "prefill_s": PROMPT_LEN / p,
            "decode_s": NEW_TOKENS / d,
            "output_ids": j.get("output_ids"),
            "tprun": {k: j.get(k) for k in ("model", "world_size", "threads_per_rank", "isa",
                                            "bf16_dot", "rounds")}
            | {"prefill_tok_s_all": tm["prefill_tok_s_all"],
               "decode_tok_s_all": tm["decode_tok_s_all"],
               "roofline": j.get("roofline"),
               "decode_floor_pct": tm.get("decode_floor_pct"),
               "prefill_peak_pct": tm.get("prefill_peak_pct")},
        }

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# run: interleaved rounds, table, JSON
# ---------------------------------------------------------------------------------------------


def fmt(best: float, lo: float, hi: float, digits: int) -> str:
    if lo == hi:
        return f"{best:.{digits}f}"
    return f"{best:.{digits}f} ({lo:.{digits}f}..{hi:.{digits}f})"


def run(args: argparse.Namespace) -> None:
    names = PEERS + (TPRUN_SYSTEMS if args.tprun else [])
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in want if s not in PEERS + TPRUN_SYSTEMS]
        if bad:
            sys.exit(f"--only: unknown system(s) {', '.join(bad)}; known: "
                     f"{', '.join(PEERS + TPRUN_SYSTEMS)}")
        if any(s in TPRUN_SYSTEMS for s in want) and not args.tprun:
            sys.exit("--only names a tprun system but --tprun PATH is not given")
        names = want
    if args.tprun and not Path(args.tprun).is_file():
        sys.exit(f"--tprun {args.tprun}: no such file")
    need = {"llama-bf16": GGUF_NAMES["bf16"], "llama-f16": GGUF_NAMES["f16"],
            "hf-bf16": HF_NAME, "hf-f32": HF_NAME, "tprun-n2-model": HF_NAME}
    for n in names:
        if n in need and not (Path(args.model_dir) / need[n]).exists():
            sys.exit(f"{n}: {Path(args.model_dir) / need[n]} does not exist (run `models` first)")

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load0 = os.getloadavg()
    systems = {}
    try:
        for n in names:
            t0 = time.perf_counter()
            systems[n] = Tprun(n, args) if n in TPRUN_SYSTEMS else Worker(n, args)
            print(f"{n}: ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rounds: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                time.sleep(0.2)  # let the previous system's threads go idle
                res = systems[n].round()
                res["load_avg"] = os.getloadavg()[0]
                rounds[n].append(res)
                extra = ""
                if "llama_perf" in res:
                    lp = res["llama_perf"]
                    extra = (f"   [llama_perf: prefill {1e3 * lp['n_p_eval'] / lp['t_p_eval_ms']:.1f},"
                             f" decode {1e3 * lp['n_eval'] / lp['t_eval_ms']:.1f} tok/s]")
                print(f"round {r + 1}/{args.rounds} {n:17s} prefill "
                      f"{PROMPT_LEN / res['prefill_s']:8.1f} tok/s  decode "
                      f"{NEW_TOKENS / res['decode_s']:6.1f} tok/s{extra}", file=sys.stderr)
    finally:
        for s in systems.values():
            s.close()

    t = args.threads
    print(f"\nQwen2.5-0.5B shapes, random bf16 weights, prompt {PROMPT_LEN}, {NEW_TOKENS} greedy "
          f"decode steps, {t} threads, best of {args.rounds} (range in brackets); "
          f"{cpu_model()}, load average "
          f"{load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end\n")
    print("| system | prefill tok/s best (range) | decode tok/s best (range) | issue |")
    print("| --- | --- | --- | --- |")
    summary = {}
    for n in names:
        pre = [PROMPT_LEN / x["prefill_s"] for x in rounds[n]]
        dec = [NEW_TOKENS / x["decode_s"] for x in rounds[n]]
        summary[n] = {"prefill_tok_s": max(pre), "decode_tok_s": max(dec),
                      "prefill_tok_s_all": pre, "decode_tok_s_all": dec}
        issue = ISSUE.get(n)
        print(f"| {LABELS[n].format(T=t)} | {fmt(max(pre), min(pre), max(pre), 1)} | "
              f"{fmt(max(dec), min(dec), max(dec), 1)} | "
              f"{f'{issue[0]} / {issue[1]}' if issue else ''} |")
        if rounds[n] and "llama_perf" in rounds[n][0]:
            lp = [x["llama_perf"] for x in rounds[n]]
            lpre = [1e3 * x["n_p_eval"] / x["t_p_eval_ms"] for x in lp]
            ldec = [1e3 * x["n_eval"] / x["t_eval_ms"] for x in lp]
            summary[n]["llama_perf_prefill_tok_s"] = max(lpre)
            summary[n]["llama_perf_decode_tok_s"] = max(ldec)
            print(f"| ↳ llama.cpp's own counters | {fmt(max(lpre), min(lpre), max(lpre), 1)} | "
                  f"{fmt(max(ldec), min(ldec), max(ldec), 1)} | |")
    # Same weights, same prompt: the peers' greedy ids should agree (bf16 rounding may split
    # them late); tprun's rows use their own prompt (and, with --preset, their own weights).
    peers = [n for n in names if n in PEERS and rounds[n]]
    agree = {}
    if peers:
        ref = rounds[peers[-1]][-1]["output_ids"]
        for n in peers:
            ids = rounds[n][-1]["output_ids"]
            agree[n] = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), len(ids))
        print(f"\ngreedy ids of the last round, agreeing with {peers[-1]}'s for the first: "
              + ", ".join(f"{n} {k}/{NEW_TOKENS}" for n, k in agree.items()))
    sysinfo = next((s.info["system_info"] for s in systems.values()
                    if "system_info" in s.info), None)
    if sysinfo:
        print(f"\nllama.cpp system info: {sysinfo}")

    if args.out:
        doc = {
            "started": started,
            "case": {"shapes": QWEN05, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                     "prompt_seed": PROMPT_SEED, "threads": t, "rounds": args.rounds},
            "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                     "load_avg_start": load0, "load_avg_end": os.getloadavg()},
            "summary": summary,
            "greedy_ids_agree_prefix": agree,
            "issue": {n: {"prefill_tok_s": v[0], "decode_tok_s": v[1]} for n, v in ISSUE.items()},
            "systems": {n: {"info": systems[n].info, "warmup": systems[n].warmup,
                            "rounds": rounds[n]} for n in names},
        }
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"raw numbers: {args.out}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    m = sub.add_parser("models", help="make the random checkpoint and its BF16/F16 GGUFs")
    m.add_argument("--model-dir", default="/tmp/peers")
    m.add_argument("--llama-cpp-src", help="llama.cpp source tree (convert_hf_to_gguf.py)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--force", action="store_true", help="remake files that exist")
    r = sub.add_parser("run", help="run the benchmark (the default)")
    r.add_argument("--rounds", type=int, default=4)
    r.add_argument("--only", help=f"comma list of: {', '.join(PEERS + TPRUN_SYSTEMS)}")
    r.add_argument("--model-dir", default="/tmp/peers")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--tprun", help="tprun binary: adds the tprun rows")
    r.add_argument("--out", help="write every raw number to this JSON file")
    w = sub.add_parser("_worker")
    w.add_argument("--system", required=True)
    w.add_argument("--model-dir", required=True)
    w.add_argument("--threads", type=int, required=True)
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("models", "run", "_worker", "-h", "--help"):
        argv = ["run"] + argv
    args = ap.parse_args(argv)
    if args.cmd == "models":
        make_models(args)
    elif args.cmd == "_worker":
        worker(args)
    else:
        if args.rounds < 1 or args.threads < 1:
            sys.exit("--rounds and --threads must be at least 1")
        run(args)


if __name__ == "__main__":
    main()
