"""LLaMA-family decoder: the math, transcribed.

One `Transformer` covers Llama 2, Llama 3/3.1/3.2, Mistral, TinyLlama, SmolLM2 and Vicuna: they differ
only in numbers that `ModelArgs.from_hf_config` reads from the checkpoint's HF `config.json`.

Our weight names (a converted `model.pth` uses exactly these):
    tok_embeddings.weight, norm.weight, output.weight (absent when embeddings are tied)
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight
    layers.{i}.attention.wqkv.weight   = cat(q_proj, k_proj, v_proj)   (HF rotate-half layout, no permute)
    layers.{i}.attention.wo.weight     = o_proj
    layers.{i}.feed_forward.w13.weight = cat(gate_proj, up_proj)
    layers.{i}.feed_forward.w2.weight  = down_proj
q/k/v and gate/up are fused so that a decode step runs 4 matmuls per layer instead of 7: at batch 1 every
kernel launch and every pass over the activations costs, and the fused weights are read exactly once.

This file imports nothing of ours and touches no files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_local_heads: int = -1          # key/value heads (GQA); -1 → n_head
    head_dim: int = -1               # -1 → dim // n_head
    intermediate_size: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of num_key_value_heads={self.n_local_heads}")

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        """`config` is a path to an HF config.json or the parsed dict. Raises ValueError (one clear line)
        for anything that is not a LLaMA-family decoder we can run exactly."""
        if not isinstance(config, dict):
            import json
            with open(config) as f:
                config = json.load(f)
        archs = config.get("architectures") or []
        mtype = config.get("model_type")
        if mtype not in SUPPORTED_MODEL_TYPES or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
            raise ValueError(
                f"unsupported model: architectures={archs} model_type={mtype!r}; eaglet runs LLaMA-family "
                f"decoders ({', '.join(SUPPORTED_ARCHITECTURES)})")
        need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [k for k in need if k not in config]
        if missing:
            raise ValueError(f"config.json is missing {', '.join(missing)}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act={act!r} (LLaMA uses silu)")
        # transformers < 5 writes rope_scaling + rope_theta; >= 5 writes rope_parameters holding both
        scaling = config.get("rope_scaling") or config.get("rope_parameters")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
            if kind == "default":
                scaling = None
        eos = config.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        n_head = config["num_attention_heads"]
        rope_theta = config.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 moves it into rope_parameters
            rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            dim=config["hidden_size"],
            n_layer=config["num_hidden_layers"],
            n_head=n_head,
            n_local_heads=config.get("num_key_value_heads") or n_head,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_base=float(rope_theta),
            rope_scaling=scaling,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            sliding_window=config.get("sliding_window"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos,
        )


# Attention reads every cache slot its mask covers, and on a CPU that is not free: with a 1024-slot cache,
# attention over all slots was a quarter of a SmolLM2-135M decode step and 40% of a 12-token verify
# (bf16, 2 cores), most of it spent on empty slots. So CPU callers that know how far the sequence reaches
# pass a mask only as wide as needed, rounded up to WIDTH_BLOCK slots; its width is marked dynamic, so one
# compiled graph serves every width. On CUDA the full cache is kept: attention there is cheap next to a
# kernel launch, and CUDA graphs want one shape.
WIDTH_BLOCK = 64


def visible_width(end: int, max_seq_length: int, device) -> int:
    """Cache slots a forward must attend to when its last token sits at slot end - 1."""
    if torch.device(device).type == "cuda":
        return max_seq_length
    return min(max_seq_length, -(-end // WIDTH_BLOCK) * WIDTH_BLOCK)


def narrow_mask(mask: Tensor, width: int) -> Tensor:
    """mask[..., :width] (contiguous), its width marked dynamic so compiled callers do not recompile."""
    m = mask[..., :width].contiguous()
    torch._dynamo.maybe_mark_dynamic(m, m.dim() - 1)
    return m


# Query rows per kv head up to which compiled CPU attention is plain broadcast-and-reduce (few_rows_attention)
# instead of SDPA: a decode step (rows = the query heads sharing a kv head), small draft steps, and the verify
# of a 4-token tree (12 rows for SmolLM2's 3 query heads per kv head). There, on an AMD EPYC (fp32, 30 layers,
# ~300 visible slots, kernel profile of the compiled forward, 2026-12-02) the fused loops took about what
# SDPA's kernel did (3.2-3.9 vs 3.5-3.7 ms) but saved ~1.1 ms of the graph wrapper's per-op calls (SDPA's
# transposes and views): 22.1-25.6 ms a forward against 27.4-29.4. The bound is 24 so that the 8-token verify
# of a tree with lookup nodes (speculative.LookupBranchDrafter: 24 rows) takes this path too: compiled fp32
# verify at ~200 slots on the EPYC, 30.5-31.6 ms with SDPA against 23.1-24.6 ms fused; in one process over 8
# MT-bench prompts (256 tokens, lookup nodes on) EAGLE went 103.0 -> 107.5 tok/s, all outputs identical. Past
# that it is mixed: at 12 tokens (36 rows) SDPA was faster (31.1 vs 34.8 ms), at 16 slower.
FEW_ROWS = 24
# Where it builds (AVX-512 CPUs), generate.load_cpu_attention (via cpu_kernels) sets this to
# torch.ops.eaglet.few_rows_attention (attention_cpu.cpp) and compiled CPU attention of up to KERNEL_ROWS rows per
# kv head runs that kernel instead of few_rows_attention or SDPA. In one process on an AMD EPYC (2026-12-07,
# compiled bf16 SmolLM2-135M forward at 300 cached slots, medians of 60 interleaved calls): 1 token 10.99 -> 10.74
# ms, 4 tokens 12.64 -> 11.56, 8 tokens 15.66 -> 14.05. The one-token gain is small because Inductor fused RoPE
# and the cache write into its own attention loops; a kernel call leaves them to a kernel of their own. The kernel
# also beats SDPA where few_rows_attention does not, so it takes up to KERNEL_ROWS rows per kv head: 30 compiled
# layers, 3 kv heads, 320 slots, same EPYC, medians of 40, per layer, SDPA against the kernel: bf16 24 rows 100 vs
# 54 us, 36 rows 129 vs 67, 48 rows 140 vs 81, 72 rows 221 vs 118; fp32 24 rows 112 vs 67, 48 rows 255 vs 185.
FEW_ROWS_KERNEL = None
KERNEL_ROWS = 64


def few_rows_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few query rows, written so that Inductor fuses it into two reduction loops over the
    cache (nothing [rows, width, head_dim]-sized is materialized when compiled). On the 2-core AVX-512 CPU this
    was built on, for a decode step of SmolLM2-135M (3 rows per kv head, 320 visible slots, 30 layers) it took
    0.47 ms against SDPA's 1.14 ms, whose per-call set-up dominates at this size; there SDPA won from ~16 rows,
    on the EPYC only past 24 (see FEW_ROWS). Scores and softmax in fp32, as SDPA's CPU kernel does.

    Two things keep the loop over cache slots lean (AMD EPYC, 2026-12-02, one layer of a 4-token SmolLM2 verify:
    12 rows per kv head, 256 slots, compiled, medians of 400 interleaved calls: bf16 146 -> 96 µs, fp32 113 ->
    97 µs; a decode step's 3 rows 42 -> 37 µs in bf16): q is scaled and put in a buffer of its own first
    (_realized), else Inductor inlines q's RoPE, casts and GQA reshape into the score loop and recomputes them
    for every slot; and the softmax's division comes after the sum over values (rows x head_dim divisions,
    not one per slot)."""
    dtype = q.dtype
    q = _realized(q.float() * (q.shape[-1] ** -0.5))
    s = (q.unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1).masked_fill(~mask, float("-inf"))
    e = (s - s.amax(-1, keepdim=True)).exp()
    return ((e.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2) / e.sum(-1, keepdim=True)).to(dtype)


def _shared_mask(mask: Tensor) -> Tensor:
    """The attention mask, computed once into a buffer that every layer reads. A tree verify builds its mask
    in the graph (tree mask, cache length, visible columns); left inline, Inductor recomputes it inside
    each layer's attention loops, twice per (row, slot) block."""
    return _realized(mask)


def _realized(x: Tensor) -> Tensor:
    """x, computed into a buffer of its own by Inductor instead of recomputed inside each loop that reads it.
    (Inductor's stride-forcing prim realizes its input; eagerly it is a no-op for an x with these strides.)"""
    if x.requires_grad:     # the prim has no autograd formula; a graph that trains keeps the inlined form
        return x
    from torch._inductor import inductor_prims  # noqa: F401  (registers the prim; compiling imports it anyway)
    return torch.ops.prims.inductor_force_stride_order(x, x.stride())


class KVCache(nn.Module):
    """Preallocated [batch, kv_heads, max_seq_length + 1, head_dim] keys and values. Slots are written in
    place, so shapes never change and a compiled step never recompiles as the sequence grows.

    The last slot is never used. It is there so that a width-bounded view of the cache (visible_width) is
    never the whole buffer: a whole-buffer view is contiguous and a narrower one is not, and a compiled
    graph guards on that difference, so the full width would cost a recompilation at the cache's end."""

    def __init__(self, batch_size, max_seq_length, n_kv_heads, head_dim, dtype):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_length + 1, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # input_pos: [T] cache slots shared by the batch; k, v: [B, kv_heads, T, head_dim]
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and only then cast back, as HF does: bf16 variance loses digits that logits notice.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between is interpolated.
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled)


def rope_cache(args: ModelArgs, length: int) -> tuple[Tensor, Tensor]:
    inv_freq = rope_inv_freq(args)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    if torch.compiler.is_compiling():
        # a roll times a sign (negation is exact: the same bits as the cat). Inductor writes a cat into one
        # buffer through two aliased views, each a Python call in the compiled step's wrapper (4 a layer).
        # With Attention's unsliced cache, compiled SmolLM2 forwards on an AMD EPYC (one process, medians of 30
        # interleaved, 2026-12-07): bf16 1 token 11.77 -> 11.64 ms, 4 tokens 13.10 -> 12.89, 8 15.20 -> 15.00;
        # int8 8.60 -> 8.03, 12.61 -> 12.22, 20.84 -> 19.96.
        sign = torch.where(torch.arange(x.shape[-1], device=x.device) < h, -1.0, 1.0).to(x.dtype)
        return torch.roll(x, h, -1) * sign
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, T, hd]; cos/sin: [B or 1, 1, T, hd] in x's dtype (as HF rounds them)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        total = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.wqkv = nn.Linear(args.dim, total, bias=args.attention_bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, args.dim, bias=args.attention_bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_head // self.n_kv
        compiled_cpu = q.device.type == "cpu" and torch.compiler.is_compiling()
        kernel = (compiled_cpu and FEW_ROWS_KERNEL is not None and rep * T <= KERNEL_ROWS
                  and self.head_dim % 16 == 0 and self.head_dim <= 128)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            # attend to the slots the mask covers: a mask narrower than the cache skips its empty tail
            # (see visible_width). The kernel reads only the mask's width of the cache it is given, and a
            # slice here would cost the compiled wrapper two more views a layer.
            if not kernel:
                k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        # GQA without copying the cache: the `rep` query heads sharing a kv head become extra query rows of
        # that head (head h = j*rep + r uses kv head j, as repeat_interleave would).
        q = q.reshape(B, self.n_kv, rep * T, self.head_dim)
        if kernel:
            y = FEW_ROWS_KERNEL(q, k, v, mask)    # stacked row r reads mask row r % T: no expanded mask
        else:
            if rep > 1:
                mask = mask.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(mask.shape[0], 1, rep * T, -1)
            if compiled_cpu and rep * T <= FEW_ROWS:
                y = few_rows_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.view(B, self.n_head, T, self.head_dim)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, input_norm: bool = True):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        # EAGLE's draft layer drops the input norm (its input is already a mix of normed feature and embedding)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps) if input_norm else nn.Identity()
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None):
        """Allocate KV caches, the causal mask and the RoPE table for `max_seq_length` slots."""
        if max_seq_length > self.args.max_position_embeddings:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's "
                             f"max_position_embeddings {self.args.max_position_embeddings}")
        ref = self.tok_embeddings.weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.bfloat16)
        device = ref.device
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        a = self.args
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, a.n_local_heads, a.head_dim,
                                               dtype).to(device)
        cos, sin = rope_cache(a, max_seq_length)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        causal = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool, device=device))
        if a.sliding_window is not None and a.sliding_window < max_seq_length:
            causal &= ~torch.tril(causal, diagonal=-a.sliding_window)
        self.register_buffer("causal_mask", causal, persistent=False)

    def causal_rows(self, start: int, end: int) -> Optional[Tensor]:
        """The causal mask [1, 1, end - start, w] of tokens at slots start..end-1, only as wide as the slots
        they can see (visible_width); None on CUDA, where the forward builds the full one itself."""
        dev = self.causal_mask.device
        if dev.type == "cuda":
            return None
        return narrow_mask(self.causal_mask[start:end][None, None], visible_width(end, self.max_seq_length, dev))

    def hidden(self, idx: Tensor, input_pos: Tensor, mask: Optional[Tensor] = None,
               pos: Optional[Tensor] = None) -> Tensor:
        """Final *normed* hidden state [B, T, dim] (EAGLE's feature).

        idx: [B, T] token ids; input_pos: [T] cache slots to write; mask: optional bool
        [B or 1, 1, T, W] over cache slots 0..W-1, W <= max_seq_length (True = attend; tree attention passes
        its own; default: causal over the whole cache);
        pos: optional RoPE positions ([T] or [B, T]); defaults to input_pos (they differ for tree tokens,
        which sit in consecutive slots but share depths).
        """
        if mask is None:
            mask = self.causal_mask[input_pos][None, None]
        if pos is None:
            pos = input_pos
        if mask.device.type == "cpu" and torch.compiler.is_compiling():
            mask = _shared_mask(mask)
        x = self.tok_embeddings(idx)
        cos, sin = self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype)
        if cos.dim() == 2:      # [T, hd] → [1, 1, T, hd]
            cos, sin = cos[None, None], sin[None, None]
        else:                   # [B, T, hd] → [B, 1, T, hd]
            cos, sin = cos[:, None], sin[:, None]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)

    def forward(self, idx: Tensor, input_pos: Tensor, mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, return_hidden: bool = False):
        h = self.hidden(idx, input_pos, mask, pos)
        logits = self.output(h)
        return (logits, h) if return_hidden else logits
