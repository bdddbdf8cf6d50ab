"""HF LLaMA-family checkpoint directory → our model.pth (see checkpoint.py for the file format)."""
from __future__ import annotations

import re

import torch


def hf_key_map(args) -> dict:
    """Our name → list of HF names concatenated along dim 0 (q/k/v and gate/up are fused)."""
    m = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not args.tie_embeddings:
        m["output.weight"] = ["lm_head.weight"]
    for i in range(args.n_layer):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        m[p + "attention.wqkv.weight"] = [q + f"self_attn.{x}_proj.weight" for x in "qkv"]
        m[p + "attention.wo.weight"] = [q + "self_attn.o_proj.weight"]
        m[p + "feed_forward.w13.weight"] = [q + "mlp.gate_proj.weight", q + "mlp.up_proj.weight"]
        m[p + "feed_forward.w2.weight"] = [q + "mlp.down_proj.weight"]
        m[p + "attention_norm.weight"] = [q + "input_layernorm.weight"]
        m[p + "ffn_norm.weight"] = [q + "post_attention_layernorm.weight"]
        if args.attention_bias:
            m[p + "attention.wqkv.bias"] = [q + f"self_attn.{x}_proj.bias" for x in "qkv"]
            m[p + "attention.wo.bias"] = [q + "self_attn.o_proj.bias"]
        if args.mlp_bias:
            m[p + "feed_forward.w13.bias"] = [q + "mlp.gate_proj.bias", q + "mlp.up_proj.bias"]
            m[p + "feed_forward.w2.bias"] = [q + "mlp.down_proj.bias"]
    return m
