"""The EAGLE draft network and how it proposes a draft tree.

EAGLE (Li et al. 2024) drafts at the *feature* level: the draft sees the target's final normed hidden
state f_t together with the token one step ahead, x_{t+1}, and predicts the next feature; the target's own
(frozen) LM head turns that into token logits. Step t:

    x = fc(cat(embed(x_{t+1}), f_t))       # 2d → d
    h = layer(x)                           # one LLaMA decoder layer without its input norm, no final norm
    logits = lm_head(h)                    # the target's head, shared in memory, never copied

So draft slot t holds (f_t, x_{t+1}) at RoPE position t: the same slot numbering as the target's cache.
The embedding and LM head are the target's modules, bound with `bind_target` and deliberately *not*
registered as submodules: they stay out of the draft's state dict and are never duplicated.

Draft vocabulary: with `d2t` (a LongTensor of N target ids, most frequent first) the draft scores only
those N tokens. It keeps a gathered copy of those N rows of the LM head (N × d, e.g. 8k × 576) so a draft
step reads N rows instead of the whole head; the target still verifies over the full vocabulary, so the
output stays lossless, only acceptance can drop.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

import model as M
from checkpoint import UserError, atomic_save, read_checkpoint

# Config keys that a draft must share with its target (HF names, as in the target's config.json).
_MATCH_KEYS = ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


def draft_args(target_args: M.ModelArgs) -> M.ModelArgs:
    """The draft layer is a decoder layer of the target's shape (EAGLE-1/2 use the target's config)."""
    return dataclasses.replace(target_args, n_layer=1)


class EagleDraft(nn.Module):
    def __init__(self, target_args: M.ModelArgs, fc_bias: bool = True, draft_vocab: Optional[Tensor] = None):
        super().__init__()
        self.args = draft_args(target_args)
        dim = self.args.dim
        self.fc = nn.Linear(2 * dim, dim, bias=fc_bias)
        self.layer = M.TransformerBlock(self.args, input_norm=False)
        if draft_vocab is not None:
            self.register_buffer("d2t", torch.as_tensor(draft_vocab, dtype=torch.long).clone())
        else:
            self.d2t = None
        self.max_seq_length = -1
        # bound later (bind_target); kept out of _modules so they are not saved, copied or moved with the draft
        object.__setattr__(self, "embed", None)
        object.__setattr__(self, "lm_head", None)
        object.__setattr__(self, "head_weight", None)

    @property
    def vocab_size(self) -> int:
        """Size of the draft's own vocabulary (N with a draft vocabulary, else the target's)."""
        return self.d2t.numel() if self.d2t is not None else self.args.vocab_size

    def bind_target(self, target: M.Transformer) -> "EagleDraft":
        object.__setattr__(self, "embed", target.tok_embeddings)
        object.__setattr__(self, "lm_head", target.output)
        head = None
        if self.d2t is not None and isinstance(target.output, nn.Linear) and target.output.weight.is_floating_point():
            # gathered copy of the N draft-vocabulary rows (N × d): a draft step reads only these
            head = target.output.weight.detach()[self.d2t.to(target.output.weight.device)].contiguous()
        object.__setattr__(self, "head_weight", head)
        return self

    # ---- caches -------------------------------------------------------------------------------
    def setup_caches(self, max_seq_length: int, dtype=None, device=None):
        """Static KV cache + RoPE table + causal mask for `max_seq_length` draft slots (batch 1)."""
        ref = self.fc.weight
        device = device or ref.device
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.bfloat16)
        a = self.args
        self.max_seq_length = max_seq_length
        self.layer.attention.kv_cache = M.KVCache(1, max_seq_length, a.n_local_heads, a.head_dim, dtype).to(device)
        cos, sin = M.rope_cache(a, max_seq_length)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", causal, persistent=False)

    # ---- the network ----------------------------------------------------------------------------
    def forward(self, features: Tensor, tokens: Tensor, input_pos: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, pos: Optional[Tensor] = None) -> Tensor:
        """features [B,T,D] (f_t), tokens [B,T] (x_{t+1}) → draft hidden [B,T,D] (predicts f_{t+1}).

        With input_pos (cache slots [T]) it reads/writes the draft's KV cache; mask is bool
        [B|1,1,T,max_seq_length] over cache slots (default causal), pos the RoPE positions (default input_pos).
        With input_pos=None (training) no cache is touched: mask is [B|1,1,T,T] (default causal) and pos
        defaults to 0..T-1.
        """
        x = self.fc(torch.cat((self.embed(tokens).to(features.dtype), features), dim=-1))
        T = tokens.shape[1]
        attn = self.layer.attention
        if input_pos is None:
            if pos is None:
                pos = torch.arange(T, device=x.device)
            if mask is None:
                mask = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))[None, None]
            n = int(pos.max()) + 1
            cos, sin = M.rope_cache(self.args, n)
            cos, sin = cos.to(x.device)[pos].to(x.dtype), sin.to(x.device)[pos].to(x.dtype)
            cache, attn.kv_cache = attn.kv_cache, None     # training never touches the inference cache
            try:
                return self.layer(x, *self._rope_shape(cos, sin), mask, None)
            finally:
                attn.kv_cache = cache
        if mask is None:
            mask = self.causal_mask[input_pos][None, None]
        if pos is None:
            pos = input_pos
        cos, sin = self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype)
        return self.layer(x, *self._rope_shape(cos, sin), mask, input_pos)

    @staticmethod
    def _rope_shape(cos, sin):
        if cos.dim() == 2:
            return cos[None, None], sin[None, None]
        return cos[:, None], sin[:, None]

    def logits(self, hidden: Tensor) -> Tensor:
        """Draft logits over the draft vocabulary [..., Vd] (Vd = N with d2t, else the target vocab)."""
        if self.head_weight is not None:
            return hidden @ self.head_weight.t()
        out = self.lm_head(hidden)
        return out if self.d2t is None else out[..., self.d2t]

    def to_target(self, ids: Tensor) -> Tensor:
        """Draft-vocabulary ids → target ids."""
        return ids if self.d2t is None else self.d2t[ids]

    def to_target_probs(self, probs: Tensor) -> Tensor:
        """A distribution over the draft vocabulary [..., Vd] → over the target vocabulary [..., V]."""
        if self.d2t is None:
            return probs
        out = probs.new_zeros(*probs.shape[:-1], self.args.vocab_size)
        return out.index_copy_(-1, self.d2t, probs)


# ---- checkpoint files ---------------------------------------------------------------------------

def target_config_dict(target_config) -> dict:
    """The HF-style description of the target a draft belongs to (from a config dict or ModelArgs)."""
    if isinstance(target_config, M.ModelArgs):
        a = target_config
        return {"hidden_size": a.dim, "vocab_size": a.vocab_size, "num_attention_heads": a.n_head,
                "num_key_value_heads": a.n_local_heads, "intermediate_size": a.intermediate_size,
                "num_hidden_layers": a.n_layer, "head_dim": a.head_dim}
    keep = _MATCH_KEYS + ("num_hidden_layers", "head_dim", "_name_or_path", "name", "model_type")
    out = {k: target_config[k] for k in keep if k in target_config}
    out.setdefault("num_key_value_heads", target_config.get("num_attention_heads"))
    return out


def save_draft(draft: EagleDraft, path, target_config, **extra_config) -> None:
    """Write a draft checkpoint (atomic). target_config: the target's HF config dict (or its ModelArgs)."""
    tcfg = target_config_dict(target_config)
    cfg = {"target": tcfg, "fc_bias": draft.fc.bias is not None,
           "draft_vocab_size": None if draft.d2t is None else int(draft.d2t.numel()), **extra_config}
    sd = {k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()}
    quant = getattr(draft, "quantization", None)
    atomic_save({"eaglet": 1, "kind": "eagle_draft", "config": cfg, "quantization": quant, "state_dict": sd}, path)


def check_fits(cfg: dict, target_args: M.ModelArgs, path="draft") -> None:
    t = cfg.get("target") or {}
    have = {"hidden_size": target_args.dim, "vocab_size": target_args.vocab_size,
            "num_attention_heads": target_args.n_head, "num_key_value_heads": target_args.n_local_heads,
            "intermediate_size": target_args.intermediate_size}
    bad = [f"{k} {t[k]} vs {have[k]}" for k in _MATCH_KEYS if k in t and t[k] is not None and t[k] != have[k]]
    if bad:
        raise UserError(f"draft {path} was made for a different target ({', '.join(bad)}); "
                        f"use the draft trained for this model (scripts/train_eagle.py or convert_hf_checkpoint.py --eagle)")


def load_draft(path, target: M.Transformer, device="cpu", dtype=torch.bfloat16) -> EagleDraft:
    """Load a draft checkpoint for `target` (raises UserError if it was made for another model)."""
    ckpt = read_checkpoint(path, "eagle_draft")
    cfg = ckpt.get("config") or {}
    check_fits(cfg, target.args, path)
    sd = dict(ckpt["state_dict"])
    d2t = sd.get("d2t")
    if d2t is not None and (d2t.numel() == 0 or int(d2t.max()) >= target.args.vocab_size or int(d2t.min()) < 0):
        raise UserError(f"draft {path} has a draft vocabulary with ids outside the target's vocabulary")
    draft = EagleDraft(target.args, fc_bias=bool(cfg.get("fc_bias", "fc.bias" in sd)), draft_vocab=d2t)
    quant = ckpt.get("quantization")
    if quant:
        import quantize  # only quantized drafts need it
        quantize.swap_linears(draft, quant)
    try:
        draft.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise UserError(f"weights in draft {path} do not fit this target: {first.strip()[:300]}")
    draft = draft.to(device=device)
    for _, t in list(draft.named_parameters()) + list(draft.named_buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    if quant:
        quantize.prepare_for_device(draft, device)
    draft.quantization = quant
    draft.checkpoint_meta = {"path": str(path), "config": cfg, "quantization": quant}
    return draft.eval().bind_target(target)


# --- training ---
# (losses and data format: owned by scripts/train_eagle.py's engineer; appended below this line)
