#!/usr/bin/env python3
"""Recomputes the fixtures' reference logits with a plain numpy Qwen2 (no torch, no transformers).

It reads config.json and the safetensors files by hand, the way the Rust loader has to, and
prints the largest difference from the recorded logits and hidden states. It shows that the
references follow from the plain Qwen2 recipe (rotate-half RoPE, query head h uses KV head
h // (heads / kv_heads), biases on q/k/v only, RMSNorm in f32) and how close f32 math gets.

    .venv/bin/python tools/check_numpy_forward.py    # needs only numpy
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one file as float32 (BF16 and F16 widened)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = data[start:end]
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] == "F16":
            arr = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        elif info["dtype"] == "F32":
            arr = np.frombuffer(buf, dtype="<f4").copy()
        else:
            raise ValueError(f"{path}: {name} has dtype {info['dtype']}")
        out[name] = arr.reshape(info["shape"])
    return out


def load_weights(d: Path) -> dict[str, np.ndarray]:
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    weights = {}
    for f in files:
        weights.update(read_safetensors(d / f))
    return weights


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, theta: float) -> np.ndarray:
    """x: [heads, seq, head_dim]; rotate-half RoPE at positions 0..seq-1."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(x.shape[1])[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, -1).astype(np.float32)
    sin = np.concatenate([np.sin(ang)] * 2, -1).astype(np.float32)
    rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def forward(cfg: dict, w: dict[str, np.ndarray], ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, seq = hidden // heads, cfg["rms_norm_eps"], len(ids)
    theta = cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg else cfg["rope_theta"]
    x = w["model.embed_tokens.weight"][ids]
    states = [x]
    mask = np.triu(np.full((seq, seq), -np.inf, dtype=np.float32), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]).reshape(seq, heads, hd).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]).reshape(seq, kv, hd).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]).reshape(seq, kv, hd).transpose(1, 0, 2)
        q, k = rope(q, theta), rope(k, theta)
        group = heads // kv
        k, v = np.repeat(k, group, 0), np.repeat(v, group, 0)  # query head h -> KV head h // group
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(seq, heads * hd) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
        states.append(x)
    x = rms_norm(x, w["model.norm.weight"], eps)
    states[-1] = x  # transformers' last hidden state is after the final norm (see cases.json)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T, states


def main() -> int:
    worst = 0.0
    for d in sorted(p for p in FIXTURES_DIR.iterdir() if (p / "reference" / "cases.json").exists()):
        cfg = json.loads((d / "config.json").read_text())
        cases = json.loads((d / "reference" / "cases.json").read_text(encoding="utf-8"))
        w = load_weights(d)
        for case in cases["logits"]:
            want = read_safetensors(d / "reference" / case["file"])["logits"]
            got, _ = forward(cfg, w, case["input_ids"])
            err = float(np.abs(got - want).max())
            worst = max(worst, err / float(np.abs(want).max()))
            same_argmax = bool((got.argmax(-1) == want.argmax(-1)).all())
            print(f"{d.name} {case['name']}: max |logit diff| {err:.2e} (max |logit| {np.abs(want).max():.1f}), argmax equal: {same_argmax}")
        hc = cases["hidden_states"]
        ids = next(c["input_ids"] for c in cases["logits"] if c["name"] == hc["case"])
        _, states = forward(cfg, w, ids)
        want = read_safetensors(d / "reference" / hc["file"])
        errs = [float(np.abs(states[i] - want[f"hidden_states.{i}"]).max()) for i in range(hc["count"])]
        print(f"{d.name} hidden states: max diffs {', '.join(f'{e:.1e}' for e in errs)}")
    print(f"worst relative logit error: {worst:.2e}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
