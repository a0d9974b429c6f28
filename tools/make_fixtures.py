#!/usr/bin/env python3
"""Make tprun's tiny random Qwen2 checkpoints and record transformers' outputs for them.

Writes tests/fixtures/<name>/ (checkpoint files plus reference/) for every fixture in FIXTURES.
Everything is seeded, so a re-run rewrites the same bytes (for the same library versions).

    tools/make_fixtures.py                 # all fixtures
    tools/make_fixtures.py tiny-sharded    # only the named ones
    tools/make_fixtures.py --check         # re-check the committed fixtures, write nothing

Needs torch, transformers, tokenizers, safetensors, jinja2, numpy (see tools/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import tokenizers
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = ROOT / "tests" / "fixtures"

# ---------------------------------------------------------------------------------------------
# Tokenizer: one byte-level BPE shaped like Qwen2's, shared by every fixture.
# ---------------------------------------------------------------------------------------------

# Qwen2's pre-tokenizer split regex (as in its tokenizer.json).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's added tokens, in its order, with its "special" flags (tool_call and FIM tokens are
# added but not special: skip_special_tokens keeps them).
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]

# Learned tokens (256 byte symbols + merges); the tokenizer's length is this + len(ADDED_TOKENS).
BPE_VOCAB_SIZE = 387
TOKENIZER_LEN = BPE_VOCAB_SIZE + len(ADDED_TOKENS)  # 409: prime, so no TP degree divides it

# Training text: mostly English, plus some multi-byte text so that merges of UTF-8 pieces exist.
CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "You are a pirate. Where is the treasure? The treasure is buried on the island.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Once upon a time there was a small model that learned to count: 1, 2, 3, 4, 5.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me about the sea, the wind, the ships and the sailors who love them.",
    "In the beginning the weather was cold, and then the spring came with rain and flowers.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "for (int i = 0; i < n; ++i) { sum += x[i] * y[i]; }",
    "Tensor parallelism splits each weight matrix across ranks; the results are all-reduced.",
    "Shared memory is fast: every rank reads and writes the same pages, with flags to wait on.",
    "I'm sure it's fine, they're here and we've seen what you'll do; he'd agree.",
    "Hello, world! How are you today? I am fine, thank you. And you?",
    "Numbers: 3.14159, 2.71828, 1000000, 42, 2024-06-01, 12:30.",
    "Café au lait, crème brûlée, naïve façade, déjà vu, résumé.",
    "Über München fährt ein schöner Zug; Grüße aus Köln!",
    "中文文本：你好，世界。我们在测试分词器。",
    "日本語のテキストも少し。こんにちは。",
    "Emoji: 🙂 🚀 ❤️ 👍 🎉 and symbols like € £ ¥ © ±.",
    "Поехали! Привет, мир.",
    "The model wrote a poem about rust, memory, threads and the quiet hum of the machine.",
    "Write a haiku about autumn leaves falling on a silent pond.",
    "My favourite number is seven, my favourite colour is blue, and my favourite food is pasta.",
]


def train_tokenizer() -> Tokenizer:
    """Trains the BPE and adds Qwen2.5's added tokens after the learned ones (as Qwen does)."""
    tok = Tokenizer(
        models.BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() == BPE_VOCAB_SIZE, tok.get_vocab_size()
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    assert tok.get_vocab_size() == TOKENIZER_LEN
    # Make the json look like Qwen2's tokenizer.json (the Python bindings write defaults here).
    j = json.loads(tok.to_str())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    j["decoder"] = dict(byte_level)
    j["post_processor"] = dict(byte_level)
    j["model"]["continuing_subword_prefix"] = ""
    j["model"]["end_of_word_suffix"] = ""
    return Tokenizer.from_str(json.dumps(j))


def token_id(content: str) -> int:
    return BPE_VOCAB_SIZE + [c for c, _ in ADDED_TOKENS].index(content)


ENDOFTEXT = token_id("<|endoftext|>")
IM_START = token_id("<|im_start|>")
IM_END = token_id("<|im_end|>")

# Qwen2.5-Instruct's chat template, verbatim (branches on tools, uses tojson, default system prompt).
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def write_tokenizer(tok: Tokenizer, out: Path, style: str) -> None:
    """Writes the tokenizer files.

    style "hub": tokenizer.json (merges as "a b" strings), vocab.json, merges.txt and a
    tokenizer_config.json laid out like Qwen2.5-Instruct's on the hub, chat template inline.
    style "v5": whatever transformers' save_pretrained writes now (chat_template.jinja beside).
    """
    if style == "v5":
        wrapped = transformers.Qwen2Tokenizer(
            tokenizer_object=tok,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            errors="replace",
            add_prefix_space=False,
            clean_up_tokenization_spaces=False,
            model_max_length=131072,
        )
        wrapped.chat_template = QWEN25_CHAT_TEMPLATE
        wrapped.save_pretrained(out)
        assert (out / "chat_template.jinja").exists()
        assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
        return

    j = json.loads(tok.to_str())
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    j["model"]["merges"] = merges
    write_json(out / "tokenizer.json", j, indent=2)
    vocab = j["model"]["vocab"]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added_decoder = {
        str(token_id(c)): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for c, special in ADDED_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [c for c, special in ADDED_TOKENS if special and c != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    write_json(out / "tokenizer_config.json", config, indent=2)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class Fixture:
    name: str
    about: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str  # torch dtype name as written in config: bfloat16 | float32 | float16
    tied: bool
    rope_theta: float
    max_pos: int
    style: str  # "hub" (transformers 4.x hub layout) or "v5" (as transformers 5 saves it)
    seed: int
    max_window_layers: int = 0
    max_shard_size: str | None = None  # set: save as several shards
    # > 0: look for a chat prompt whose greedy output ends in eos (case g3). A random model
    # hardly ever picks eos, so its embedding/lm_head row is scaled by this to make it likely.
    eos_row_scale: float = 0.0


FIXTURES = [
    Fixture(
        name="tiny-hub-bf16-tied",
        about="the default model: hub-style config, bf16, tied embeddings, padded vocab",
        hidden=64, layers=3, heads=4, kv_heads=2, intermediate=160, vocab=448,
        dtype="bfloat16", tied=True, rope_theta=10000.0, max_pos=32768, style="hub", seed=1,
        max_window_layers=2, eos_row_scale=1.8,
    ),
    Fixture(
        name="tiny-t5-f32-untied",
        about="transformers-5 style config (rope_parameters, dtype), f32, untied lm_head, "
        "uneven TP splits, vocab == len(tokenizer), max_position_embeddings 128",
        hidden=96, layers=2, heads=6, kv_heads=2, intermediate=202, vocab=TOKENIZER_LEN,
        dtype="float32", tied=False, rope_theta=500000.0, max_pos=128, style="v5", seed=2,
        max_window_layers=2,
    ),
    Fixture(
        name="tiny-sharded",
        about="hub-style config, f16, untied, 4 heads / 4 KV heads, rope_theta 1e6, several shards",
        hidden=64, layers=2, heads=4, kv_heads=4, intermediate=128, vocab=432,
        dtype="float16", tied=False, rope_theta=1000000.0, max_pos=32768, style="hub", seed=3,
        max_window_layers=2, max_shard_size="100KB",
    ),
    Fixture(
        name="qwen25-layout",
        about="Qwen2.5-0.5B attention layout (14 heads, 2 KV heads, head_dim 64, hidden 896), "
        "1 layer, small MLP, vocab == len(tokenizer), bf16, tied",
        hidden=896, layers=1, heads=14, kv_heads=2, intermediate=64, vocab=TOKENIZER_LEN,
        dtype="bfloat16", tied=True, rope_theta=1000000.0, max_pos=32768, style="hub", seed=4,
        max_window_layers=21,
    ),
]

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
EMBED_LOGIT_STD = 2.5  # aimed std of the logits: embedding std = this / sqrt(hidden)
QK_GAIN = 2.0  # q/k weight gain: sharp enough attention that greedy output varies with context


def hf_config(fx: Fixture) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=fx.vocab,
        hidden_size=fx.hidden,
        intermediate_size=fx.intermediate,
        num_hidden_layers=fx.layers,
        num_attention_heads=fx.heads,
        num_key_value_heads=fx.kv_heads,
        hidden_act="silu",
        max_position_embeddings=fx.max_pos,
        initializer_range=round(EMBED_LOGIT_STD / math.sqrt(fx.hidden), 4),
        rms_norm_eps=1e-6,
        use_cache=True,
        tie_word_embeddings=fx.tied,
        rope_parameters={"rope_type": "default", "rope_theta": fx.rope_theta},
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=fx.max_window_layers,
        attention_dropout=0.0,
        bos_token_id=ENDOFTEXT,
        eos_token_id=[IM_END, ENDOFTEXT],
        dtype=fx.dtype,
    )


def randomize(model: Qwen2ForCausalLM, fx: Fixture) -> None:
    """Gives every parameter a seeded random value that matters (norms and biases too)."""
    gen = torch.Generator().manual_seed(fx.seed)
    embed_std = EMBED_LOGIT_STD / math.sqrt(fx.hidden)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # uniform 0.5..1.5
            elif name.endswith(".bias"):
                # A big v bias adds the same vector at every position and makes greedy repeat.
                std = 0.1 if "v_proj" in name else 0.3
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "embed_tokens" in name or "lm_head" in name:
                w = torch.randn(p.shape, generator=gen) * embed_std
                # Rows past the tokenizer (vocab padding, as real Qwen has) stay small, so greedy
                # never picks a token the tokenizer cannot decode; their logits are still nonzero.
                w[TOKENIZER_LEN:] *= 0.1
                if fx.eos_row_scale:
                    w[IM_END] *= fx.eos_row_scale
                p.copy_(w)
            else:
                gain = QK_GAIN if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * gain / math.sqrt(p.shape[1]))


def hub_config_json(fx: Fixture) -> dict:
    """config.json in the layout of Qwen2.5's on the hub (transformers 4.x)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "hidden_act": "silu",
        "hidden_size": fx.hidden,
        "initializer_range": round(EMBED_LOGIT_STD / math.sqrt(fx.hidden), 4),
        "intermediate_size": fx.intermediate,
        "max_position_embeddings": fx.max_pos,
        "max_window_layers": fx.max_window_layers,
        "model_type": "qwen2",
        "num_attention_heads": fx.heads,
        "num_hidden_layers": fx.layers,
        "num_key_value_heads": fx.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": fx.rope_theta,
        "sliding_window": 32768,
        "tie_word_embeddings": fx.tied,
        "torch_dtype": fx.dtype,
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": fx.vocab,
    }


def hub_generation_config_json() -> dict:
    """generation_config.json like Qwen2.5-Instruct's, less repetition_penalty (see README)."""
    return {
        "bos_token_id": ENDOFTEXT,
        "pad_token_id": ENDOFTEXT,
        "do_sample": True,
        "eos_token_id": [IM_END, ENDOFTEXT],
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "transformers_version": "4.37.0",
    }


def write_checkpoint(fx: Fixture, tok: Tokenizer, out: Path) -> None:
    torch.manual_seed(fx.seed)
    model = Qwen2ForCausalLM(hf_config(fx)).to(torch.float32)
    randomize(model, fx)
    model = model.to(TORCH_DTYPES[fx.dtype])
    kwargs = {"max_shard_size": fx.max_shard_size} if fx.max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    if fx.style == "hub":
        write_json(out / "config.json", hub_config_json(fx), indent=2)
        write_json(out / "generation_config.json", hub_generation_config_json(), indent=2)
    else:
        GenerationConfig(
            bos_token_id=ENDOFTEXT,
            pad_token_id=ENDOFTEXT,
            eos_token_id=[IM_END, ENDOFTEXT],
            do_sample=True,
            temperature=0.7,
            top_p=0.8,
            top_k=20,
        ).save_pretrained(out)
    write_tokenizer(tok, out, fx.style)


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------

LOGIT_PROMPTS = [
    ("p0", "The cat sat."),
    ("p1", "Café 中文 🙂!"),
    ("p2", "Once upon a time there was a small model that learned to count."),
]
HIDDEN_CASE = "p1"
MAX_NEW_TOKENS = 12
MIN_MARGIN = 1e-2  # stricter than needed: f32 summation-order noise is ~1e-5

# Candidates for each generate case, tried in order until every greedy step has a clear top-1.
GEN_CASES = [
    ("g0", "prompt", None, ["The quick brown fox", "Once upon a time", "My favourite number is", "The weather today is", "Hello, how are you"]),
    ("g1", "chat", None, ["What is the capital of France?", "Write a haiku about autumn.", "Tell me a story.", "How are you today?", "Count to five."]),
    ("g2", "chat", "You are a pirate.", ["Where is the treasure?", "Tell me about the sea.", "What is your ship called?", "Sing me a song.", "Hello!"]),
]
EOS_SEARCH_WORDS = ["sea", "rust", "cat", "poem", "ship", "rain", "count", "fox", "Paris", "number", "tea", "sun"]
EOS_SEARCH_MAX_NEW = 40


def load_reference_model(out: Path):
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


def prompt_ids(tokenizer, kind: str, prompt: str, system: str | None) -> tuple[list[int], str | None]:
    if kind == "prompt":
        return tokenizer(prompt).input_ids, None
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    assert ids == tokenizer(text).input_ids, "chat ids differ from encoding the rendered text"
    return ids, text


@torch.no_grad()
def greedy(model, ids: list[int], max_new: int) -> tuple[list[int], float]:
    """model.generate greedily; returns the new ids and the smallest top1-top2 logit gap."""
    inp = torch.tensor([ids])
    res = model.generate(
        inp,
        attention_mask=torch.ones_like(inp),
        do_sample=False,
        max_new_tokens=max_new,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = res.sequences[0, len(ids) :].tolist()
    assert len(res.logits) == len(new)
    margin = math.inf
    for step, logits in zip(new, res.logits):
        top2 = torch.topk(logits[0].float(), 2)
        assert top2.indices[0].item() == step, "generate did not pick the argmax"
        margin = min(margin, (top2.values[0] - top2.values[1]).item())
    return new, margin


@torch.no_grad()
def hidden_states_note(model, ids: list[int]) -> str:
    """Finds out what the last entry of output_hidden_states is in the installed transformers."""
    captured = {}
    last_layer = model.model.layers[-1]
    handle = last_layer.register_forward_hook(lambda _m, _i, o: captured.setdefault("out", o[0] if isinstance(o, tuple) else o))
    out = model(torch.tensor([ids]), output_hidden_states=True)
    handle.remove()
    hs = out.hidden_states
    raw = captured["out"][0]
    normed = model.model.norm(captured["out"])[0]
    assert len(hs) == model.config.num_hidden_layers + 1
    embeds = model.model.embed_tokens(torch.tensor([ids]))[0]
    assert torch.equal(hs[0][0], embeds), "hidden_states.0 is not the embedding"
    if torch.equal(hs[-1][0], normed):
        last = "the output of the last decoder layer AFTER the final RMSNorm (model.norm)"
    elif torch.equal(hs[-1][0], raw):
        last = "the output of the last decoder layer BEFORE the final RMSNorm"
    else:
        raise AssertionError("cannot tell what the last hidden state is")
    return (
        f"hidden_states.0 = token embeddings; hidden_states.i (1 <= i < {len(hs) - 1}) = output of decoder "
        f"layer i-1 (residual stream, before any norm); hidden_states.{len(hs) - 1} = {last}."
    )


def write_references(fx: Fixture, out: Path) -> dict:
    ref = out / "reference"
    ref.mkdir()
    model = load_reference_model(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    cases = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "computed_with": "AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32, attn_implementation='eager'), "
        "eval(), no_grad(); weights stored in lower precision are upcast to float32",
        "logits": [],
    }
    with torch.no_grad():
        for name, text in LOGIT_PROMPTS:
            ids = tokenizer(text).input_ids
            logits = model(torch.tensor([ids])).logits[0].float().contiguous()
            assert logits.shape == (len(ids), fx.vocab)
            assert logits.std().item() >= 1.0, f"{fx.name} {name}: logits std {logits.std().item():.3f} < 1"
            save_file({"logits": logits}, ref / f"logits_{name}.safetensors")
            cases["logits"].append({"name": name, "text": text, "input_ids": ids, "file": f"logits_{name}.safetensors"})

        hidden_ids = next(c["input_ids"] for c in cases["logits"] if c["name"] == HIDDEN_CASE)
        hs = model(torch.tensor([hidden_ids]), output_hidden_states=True).hidden_states
        save_file(
            {f"hidden_states.{i}": h[0].float().contiguous() for i, h in enumerate(hs)},
            ref / f"hidden_{HIDDEN_CASE}.safetensors",
        )
        cases["hidden_states"] = {"case": HIDDEN_CASE, "file": f"hidden_{HIDDEN_CASE}.safetensors", "count": len(hs)}
        cases["hidden_states_note"] = hidden_states_note(model, hidden_ids)

    cases["generate"] = []
    for name, kind, system, candidates in GEN_CASES:
        case = find_generate_case(fx, model, tokenizer, name, kind, system, candidates, MAX_NEW_TOKENS)
        cases["generate"].append(case)
    if fx.eos_row_scale:
        candidates = [f"{a} {w}." for a in ("Tell me about", "Say", "Why") for w in EOS_SEARCH_WORDS]
        case = find_generate_case(fx, model, tokenizer, "g3", "chat", None, candidates, EOS_SEARCH_MAX_NEW, want_eos=True)
        if case is not None:
            cases["generate"].append(case)
        else:
            print(f"{fx.name}: no candidate prompt ends in eos within {EOS_SEARCH_MAX_NEW} tokens", file=sys.stderr)
    write_json(ref / "cases.json", cases, indent=2)
    return cases


def find_generate_case(fx, model, tokenizer, name, kind, system, candidates, max_new, want_eos=False):
    eos = set(model.generation_config.eos_token_id)
    for prompt in candidates:
        ids, text = prompt_ids(tokenizer, kind, prompt, system)
        assert len(ids) + max_new <= fx.max_pos, f"{fx.name} {name}: prompt too long for the context"
        new, margin = greedy(model, ids, max_new)
        if margin < MIN_MARGIN:
            continue
        ends_in_eos = bool(new) and new[-1] in eos
        # Degenerate outputs (one token repeated) would hide KV-cache and position bugs.
        if want_eos and not (ends_in_eos and len(new) >= 8 and len(set(new)) >= 5):
            continue
        if not want_eos and (ends_in_eos or len(set(new)) < 4):
            continue
        assert max(new) < TOKENIZER_LEN, f"{fx.name} {name}: greedy picked a vocab-padding token"
        case = {
            "name": name,
            "kind": kind,
            "prompt": prompt,
            "system": system,
            "prompt_ids": ids,
            "max_new_tokens": max_new,
            "output_ids": new,
            "text": tokenizer.decode(new, skip_special_tokens=True),
            "output_ids_min_margin": margin,
            "stopped_at_eos": ends_in_eos,
        }
        if text is not None:
            case["prompt_text"] = text
        return case
    if want_eos:
        return None
    raise RuntimeError(f"{fx.name} {name}: no candidate prompt has clear, varied greedy output")


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

ROUND_TRIP_TEXTS = [
    "Café über 中文 🙂, naïve!",
    "Поехали! 日本語のテキスト ❤️ 👍🏽 e\u0301",  # last one is NFD: the NFC normalizer composes it
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>x</tool_call>",
]


@torch.no_grad()
def verify(fx: Fixture, out: Path, cases: dict) -> None:
    """Reloads the saved fixture and checks it against what was recorded."""
    ref = out / "reference"
    model = load_reference_model(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == TOKENIZER_LEN <= fx.vocab
    assert model.config.vocab_size == fx.vocab and model.config.rope_parameters["rope_theta"] == fx.rope_theta
    assert not model.config.use_sliding_window and set(model.config.layer_types) == {"full_attention"}
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == fx.tied
    for case in cases["logits"]:
        assert tokenizer(case["text"]).input_ids == case["input_ids"]
        want = load_file(ref / case["file"])["logits"]
        got = model(torch.tensor([case["input_ids"]])).logits[0]
        assert torch.equal(got, want), f"{fx.name} {case['name']}: logits differ after reload"
    hidden = cases["hidden_states"]
    want = load_file(ref / hidden["file"])
    ids = next(c["input_ids"] for c in cases["logits"] if c["name"] == hidden["case"])
    got = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert len(want) == len(got) == hidden["count"] == fx.layers + 1
    assert all(torch.equal(got[i][0], want[f"hidden_states.{i}"]) for i in range(len(got)))
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text).input_ids
        back = tokenizer.decode(ids)
        assert back == unicodedata.normalize("NFC", text), (text, back)
    for case in cases["generate"]:
        ids, _ = prompt_ids(tokenizer, case["kind"], case["prompt"], case["system"])
        assert ids == case["prompt_ids"]
        new, _ = greedy(model, ids, case["max_new_tokens"])
        assert new == case["output_ids"], f"{fx.name} {case['name']}: generate differs after reload"
    default_chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert default_chat == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ), default_chat
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if fx.max_shard_size:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(files) >= 2 and sorted(set(index["weight_map"].values())) == files, files
    else:
        assert files == ["model.safetensors"], files
    stored = {}
    for f in files:
        stored.update(load_file(out / f))
    assert {t.dtype for t in stored.values()} == {TORCH_DTYPES[fx.dtype]}
    assert ("lm_head.weight" in stored) == (not fx.tied)


# ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj, indent=None) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    if indent is not None:
        # Lists of numbers on one line (a raw newline never occurs inside a JSON string).
        text = re.sub(r"\[\n\s*([-+.eE\d,\s]+?)\n\s*\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    path.write_text(text + "\n", encoding="utf-8")


def summary(fx: Fixture, out: Path, cases: dict) -> str:
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    gens = ", ".join(
        f"{g['name']}({g['kind']}, {len(g['prompt_ids'])}+{len(g['output_ids'])} tok, margin {g['output_ids_min_margin']:.3g}"
        + (", eos" if g["stopped_at_eos"] else "")
        + ")"
        for g in cases["generate"]
    )
    lens = ", ".join(f"{c['name']}={len(c['input_ids'])}" for c in cases["logits"])
    return f"{fx.name}: {size / 1024:.0f} KiB; logits prompts {lens}; generate {gens}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="fixtures to (re)make; default all")
    parser.add_argument("--check", action="store_true", help="only reload and check the fixtures on disk")
    args = parser.parse_args()
    unknown = set(args.names) - {fx.name for fx in FIXTURES}
    if unknown:
        parser.error(f"unknown fixture(s): {', '.join(sorted(unknown))}")
    torch.set_num_threads(1)  # same reduction order on every run
    torch.use_deterministic_algorithms(True)
    tok = None if args.check else train_tokenizer()
    for fx in FIXTURES:
        if args.names and fx.name not in args.names:
            continue
        out = FIXTURES_DIR / fx.name
        if args.check:
            cases = json.loads((out / "reference" / "cases.json").read_text(encoding="utf-8"))
            verify(fx, out, cases)
            print(f"ok {summary(fx, out, cases)}")
            continue
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_checkpoint(fx, tok, out)
        cases = write_references(fx, out)
        verify(fx, out, cases)
        print(summary(fx, out, cases))


if __name__ == "__main__":
    main()
