"""Tiny random LLaMA models for tests: an HF config dict, the matching transformers model (the oracle),
and our checkpoint file written from the same weights."""
import torch

from checkpoint import atomic_save


def tiny_config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **kw) -> dict:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size,
               hidden_size=hidden_size, intermediate_size=intermediate_size,
               num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
               num_key_value_heads=num_key_value_heads, tie_word_embeddings=tie_word_embeddings,
               max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
               bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    cfg.update(kw)
    return cfg


def hf_model(cfg: dict, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # Random init gives near-uniform logits; scale up so greedy choices are well separated and tests
    # of exact token equality are not decided by float rounding.
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0) if not cfg.get("tie_word_embeddings") else m.model.embed_tokens.weight.mul_(3.0)
    return m


def our_state_dict(hf, cfg):
    from convert_hf_checkpoint import hf_key_map
    from model import ModelArgs
    args = ModelArgs.from_hf_config(cfg)
    hsd = hf.state_dict()
    return {k: torch.cat([hsd[x] for x in v]).contiguous() for k, v in hf_key_map(args).items()}


def write_checkpoint(path, cfg=None, seed=0, **kw):
    """Write an eaglet target checkpoint for a random tiny model; returns (path, hf_model, cfg)."""
    cfg = cfg or tiny_config(**kw)
    hf = hf_model(cfg, seed)
    atomic_save({"eaglet": 1, "kind": "target", "config": cfg, "quantization": None,
                 "state_dict": our_state_dict(hf, cfg)}, path)
    return path, hf, cfg


def slow_down_compiled(monkeypatch, slow_fn, delay: float = 0.05) -> None:
    """Rig torch.compile so that the step compiled from `slow_fn` sleeps `delay` s per call: a kernel choice
    that times compiled candidates (choose_half_gemm, choose_half_verify) must then keep the other one."""
    import time
    real_compile = torch.compile

    def rigged_compile(fn, **kw):
        step = real_compile(fn, **kw)
        if fn is not slow_fn:
            return step

        def delayed(*a, **k):
            time.sleep(delay)
            return step(*a, **k)
        return delayed
    monkeypatch.setattr(torch, "compile", rigged_compile)
