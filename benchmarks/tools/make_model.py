#!/usr/bin/env python3
"""Make a Llama-architecture checkpoint in Hugging Face layout, with random weights.

One of quire's own benchmark tools (benchmarks/tools/): benchmarks/_common.py runs it to make the
checkpoint a benchmark needs when there is none yet.

Speed does not depend on what the weights are, only on their shapes, so a random
checkpoint of a real model's shape is a fair stand-in for throughput and latency
work when no trained weights can be fetched. The tokenizer is a byte-level BPE
trained here on local text, so prompts and outputs are real token streams.

    python make_model.py OUT_DIR --preset smollm2-135m [--dtype bfloat16] [--seed 0]

Presets copy the shapes of public models; `tiny` is for tests.
Needs: torch, safetensors, tokenizers.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

PRESETS = {
    # name: hidden, intermediate, layers, heads, kv_heads, vocab, tied, rope_theta, max_pos
    "tiny": (64, 128, 2, 4, 2, 512, True, 10000.0, 2048),
    "tiny-hd64": (256, 512, 2, 4, 2, 512, True, 10000.0, 2048),  # head_dim 64: what CPU peers' kernels accept
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True, 100000.0, 8192),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 151936, True, 1000000.0, 32768),
    "tinyllama-1.1b": (2048, 5632, 22, 32, 4, 32000, False, 10000.0, 2048),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_files():
    lib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(lib, "*.py")))
    files += sorted(glob.glob("/usr/share/common-licenses/*"))
    return [f for f in files if os.path.isfile(f)]


def train_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(corpus_files(), trainer)
    return tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    h, inter, layers, heads, kvh, vocab, tied, theta, maxpos = PRESETS[a.preset]
    os.makedirs(a.out, exist_ok=True)
    tok = train_tokenizer(min(vocab, 32000))
    tok.save(os.path.join(a.out, "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|endoftext|>")

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kvh,
        "head_dim": h // heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "rope_theta": theta,
        "max_position_embeddings": maxpos,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": a.dtype,
    }
    json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    json.dump(
        {
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_bos_token": False,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": maxpos,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        open(os.path.join(a.out, "tokenizer_config.json"), "w"),
        indent=2,
    )
    json.dump(
        {"bos_token_id": bos, "eos_token_id": eos}, open(os.path.join(a.out, "generation_config.json"), "w")
    )

    g = torch.Generator().manual_seed(a.seed)
    dt = getattr(torch, a.dtype)
    hd = h // heads

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dt)

    t = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": torch.ones(h, dtype=dt)}
    if not tied:
        t["lm_head.weight"] = w(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = w(heads * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(kvh * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(kvh * hd, h)
        t[p + "self_attn.o_proj.weight"] = w(h, heads * hd)
        t[p + "mlp.gate_proj.weight"] = w(inter, h)
        t[p + "mlp.up_proj.weight"] = w(inter, h)
        t[p + "mlp.down_proj.weight"] = w(h, inter)
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=dt)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dt)
    save_file(t, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    n = sum(x.numel() for x in t.values())
    print(
        f"{a.out}: {a.preset}, {n / 1e6:.1f}M parameters, {a.dtype}, tokenizer {tok.get_vocab_size()} tokens"
    )


if __name__ == "__main__":
    sys.exit(main())
