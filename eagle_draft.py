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
import torch.nn.functional as F
from torch import Tensor

import model as M
from checkpoint import UserError, atomic_save, load_weights, read_checkpoint

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
        # the draft-vocabulary rows of the head (bind_target): a buffer, so that a compiled draft step
        # treats it as a constant and prepacks it like any weight, but never saved
        self.register_buffer("head_weight", None, persistent=False)
        self.register_buffer("head_scales", None, persistent=False)     # set when the head rows are int8

    @property
    def vocab_size(self) -> int:
        """Size of the draft's own vocabulary (N with a draft vocabulary, else the target's)."""
        return self.d2t.numel() if self.d2t is not None else self.args.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        """The draft's compute dtype (its norm weight is never quantized)."""
        return self.layer.ffn_norm.weight.dtype

    def bind_target(self, target: M.Transformer) -> "EagleDraft":
        object.__setattr__(self, "embed", target.tok_embeddings)
        object.__setattr__(self, "lm_head", target.output)
        head = None
        out = target.output
        w = out.weight if isinstance(out, nn.Linear) else None
        if w is not None and w.is_floating_point():
            if self.d2t is not None or w.dtype != self.dtype:
                # a copy of the N draft-vocabulary rows (N × d), so a draft step reads only these, in the
                # draft's dtype (a bf16 draft beside an fp32 target reads half the bytes; the target verifies)
                head = w.detach()[self.d2t.to(w.device)] if self.d2t is not None else w.detach()
        elif self.d2t is not None:
            # a quantized head (int8/int4 target): materialise its draft-vocabulary rows once, through the
            # head itself (identity in, weight out), instead of running the whole quantized head and
            # slicing at every draft step
            with torch.no_grad():
                eye = torch.eye(self.args.dim, dtype=self.dtype, device=self.d2t.device)
                head = out(eye).t()[self.d2t]
        self.head_weight = None if head is None else head.to(self.dtype).contiguous()
        self.head_scales = None
        return self

    def quantize_head_int8(self) -> "EagleDraft":
        """Store the draft-vocabulary head rows as int8 (per-row scales): half the bytes a draft step reads.
        Only proposals change; the target still verifies every token."""
        from quantize import quantize_int8
        if self.head_weight is not None and self.head_weight.is_floating_point():
            q, scales = quantize_int8(self.head_weight)
            self.head_weight, self.head_scales = q, scales.to(self.dtype)
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
                mask: Optional[Tensor] = None, pos: Optional[Tensor] = None, kv=None) -> Tensor:
        """features [B,T,D] (f_t), tokens [B,T] (x_{t+1}) → draft hidden [B,T,D] (predicts f_{t+1}).

        With input_pos (cache slots [T]) it reads/writes the draft's KV cache; mask is bool
        [B|1,1,T,max_seq_length] over cache slots (default causal), pos the RoPE positions (default input_pos).
        With input_pos=None (training) no cache is touched: mask is [B|1,1,T,T] (default causal) and pos
        defaults to 0..T-1; `kv` (training only) holds the K/V of earlier unrolled steps (see UnrolledKV).
        """
        features = features.to(self.dtype)
        x = self.fc(torch.cat((self.embed(tokens).to(self.dtype), features), dim=-1))
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
            cache, attn.kv_cache = attn.kv_cache, kv       # training never touches the inference cache
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
        if self.head_scales is not None:
            from quantize import int8_matmul
            return int8_matmul(hidden.to(self.head_scales.dtype), self.head_weight, self.head_scales)
        if self.head_weight is not None:
            return F.linear(hidden.to(self.head_weight.dtype), self.head_weight)
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
    draft = load_weights(draft, sd, quant, device, dtype, f"weights in draft {path} do not fit this target")
    draft.quantization = quant
    draft.checkpoint_meta = {"path": str(path), "config": cfg, "quantization": quant}
    return draft.eval().bind_target(target)



# ---- proposing a draft tree ---------------------------------------------------------------------

# A static tree as root paths of child ranks (0 = the draft's best child), in priority order: every
# prefix of this list is ancestor-closed, so `static` with --tree-tokens n keeps the first n-1 entries.
# Shaped like EAGLE-1's default tree (wide near the root, a deep spine), but small: on a CPU every extra
# verified token costs (see `python speculative.py --measure-verify`).
STATIC_TREE = [
    (0,), (1,), (0, 0), (2,), (0, 1), (1, 0), (0, 0, 0), (3,), (0, 0, 1), (0, 2), (1, 1), (2, 0),
    (0, 0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 0, 1), (0, 0, 0, 0, 0), (0, 0, 2), (0, 3), (4,),
    (0, 0, 0, 0, 1), (0, 0, 0, 0, 0, 0), (0, 1, 1), (1, 2), (2, 1), (0, 0, 1, 0), (0, 0, 0, 0, 0, 0, 0),
    (5,), (0, 0, 0, 2), (1, 0, 1), (0, 0, 0, 0, 0, 1), (0, 0, 0, 0, 0, 0, 0, 0),
]


class TreePlan:
    """Static description of how the draft expands: K children per expanded node, a frontier of F nodes
    per step, `depth` steps; for static shapes also which candidates are expanded and kept.

    Candidates are numbered as they are created: 0 = root, 1..K = the root's children, then each step
    s >= 1 appends F*K children (frontier row j, child rank r → base_s + j*K + r)."""

    def __init__(self, kind: str, depth: int, topk: int, tokens: int):
        self.kind = kind
        if kind == "dynamic":
            self.K = self.F = topk
            self.depth = depth
            self.n_cand = 1 + self.K + (depth - 1) * self.F * self.K
            self.N = min(tokens, self.n_cand)
            self.frontier = self.keep = None
            return
        if kind == "chain":
            shape = [(0,) * d for d in range(1, depth + 1)]
        else:
            shape = [p for p in STATIC_TREE if len(p) <= depth][:max(tokens - 1, 1)]
        self.depth = max(len(p) for p in shape)
        self.K = 1 + max(p[-1] for p in shape)
        parents = [[p[:-1] for p in shape if len(p) == s + 1] for s in range(self.depth)]
        # frontier at step s (s >= 1): the distinct depth-s nodes that have children, padded to F
        fronts = [sorted(set(ps), key=shape.index) for ps in parents[1:]]
        self.F = max([len(f) for f in fronts] + [1])
        index = {(): 0}
        index.update({(r,): 1 + r for r in range(self.K)})
        base = 1 + self.K
        self.frontier = []
        for s, front in enumerate(fronts, start=1):
            front = front + [front[0]] * (self.F - len(front))
            self.frontier.append([index[p] - (base - (self.K if s == 1 else self.F * self.K)) for p in front])
            for j, p in enumerate(front):
                for r in range(self.K):
                    index.setdefault(p + (r,), base + j * self.K + r)
            base += self.F * self.K
        self.n_cand = base
        self.keep = sorted(index[p] for p in shape)
        self.N = len(self.keep) + 1


class EagleDrafter:
    """Proposes trees with an EAGLE draft; keeps the draft's KV cache in step with the target's.

    Draft slot t holds (f_t, x_{t+1}). Between rounds the draft has slots 0..L-1 (L = tokens in the
    target cache) and `h_root`, its output at slot L-1, which scores the root's children. Tree nodes are
    written to slots L.. as the tree grows (depth-s frontier node at RoPE position L-1+s); after a round
    the accepted tokens are re-run through the draft with the target's *true* features (EAGLE does the
    same: the tree's K/V were computed from the draft's own predicted features, which are worse inputs).

    A round of the speculative loop is propose → verify → update. `update` does the catch-up *and* already
    proposes the next round's tree (its root is the bonus token, at L + n_accepted, which is exactly what
    the loop asks for next), in one function: compiled, that is one graph per round for the draft, whose
    dozens of small ops (top-k, masks, the tree's bookkeeping) would otherwise each cost an eager dispatch.
    Only the first round after prefill proposes on its own.
    """

    method = "eagle"

    def __init__(self, draft: EagleDraft, tree: str = "dynamic", depth: int = 5, topk: int = 8,
                 tokens: int = 32, compile: bool = False):
        if tree not in ("dynamic", "static", "chain"):
            raise ValueError(f"unknown tree kind {tree!r}")
        self.draft = draft
        self.plan = TreePlan(tree, depth, 1 if tree == "chain" else topk, tokens)
        # Sampling keeps only trees whose shape cannot depend on the tokens drawn (see _children), which
        # confines a dynamic tree to breadth-first filling: 12 tokens never reach depth 3. A static shape
        # (fixed draw ranks, chains included) is value-independent at any depth: on 4 MT-bench prompts at
        # temperature 1 (bf16, eager) τ was 1.88 dynamic vs 1.97 static with the same 12 tokens, and a
        # round cost 74 ms instead of 92. So at temperature > 0 a dynamic tree's budget grows a static one.
        self.sample_plan = TreePlan("static", depth, topk, tokens) if tree == "dynamic" else self.plan
        self.N = max(self.plan.N, self.sample_plan.N)
        self.max_depth = max(self.plan.depth, self.sample_plan.depth)
        self.round_step = self.catch_up_and_propose
        if compile:
            from generate import compile_step
            self.round_step = compile_step(self.catch_up_and_propose, draft, draft.fc.weight.device)
        self.h_root = None
        self.next_tree = None
        self.temperature = 0.0

    def setup(self, max_seq_length: int, dtype, device) -> None:
        extra = max(self.max_depth + 1, self.tree_slots) + 1
        need = max_seq_length + extra
        if self.draft.max_seq_length < need:
            self.draft.setup_caches(need, dtype=self.draft.dtype, device=device)

    @property
    def tree_slots(self) -> int:
        """Draft cache slots a proposal writes past L (the frontier nodes of depths 1..depth-1)."""
        return max((p.depth - 1) * p.F for p in (self.plan, self.sample_plan)) or 1

    def caches(self):
        return [self.draft.layer.attention.kv_cache]

    def prefill(self, prompt: Tensor, features: Tensor, first: Tensor) -> None:
        T = prompt.shape[0]
        toks = torch.cat([prompt[1:], first.view(1)])
        d = self.draft
        mask = M.narrow_mask(d.causal_mask[:T][None, None], M.visible_width(T, d.max_seq_length, prompt.device))
        hid = d(features[None], toks[None], torch.arange(T, device=prompt.device), mask)[0]
        self.h_root = hid[-1]
        self.next_tree = None

    def _cols(self, end: int) -> Tensor:
        from speculative import width_cols
        dev = self.draft.fc.weight.device
        return width_cols(M.visible_width(end, self.draft.max_seq_length, dev), dev)

    def propose(self, root: Tensor, L: Tensor, temperature: float = 0.0, Lh: Optional[int] = None):
        """The round's tree, root at slot L (Lh: L on the host, when known, bounds the slots attended).
        After the first round it is the one `update` already built for this root and slot."""
        if self.next_tree is not None and temperature == self.temperature:
            tree, self.next_tree = self.next_tree, None
            return tree
        self.temperature = temperature
        end = self.draft.max_seq_length if Lh is None else Lh + self.tree_slots
        return self.tree_from(self.h_root, root, L, self._cols(end), temperature)

    def update(self, tree, path: Tensor, n_acc: Tensor, bonus: Tensor, features: Tensor, L: Tensor,
               Lh: Optional[int] = None, n: Optional[int] = None) -> None:
        """After a round that accepted n_acc tokens (0-dim tensor, root included; n: the same on the host):
        feed their true target features back, then propose the next round's tree."""
        J = path.shape[0]
        if Lh is None:
            end = self.draft.max_seq_length
        else:
            n = int(n_acc) if n is None else n
            end = max(Lh + J, Lh + n + self.tree_slots)
        self.h_root, self.next_tree = self.round_step(tree.tokens, path, n_acc, bonus, features, L,
                                                      self._cols(end), self.temperature)

    def catch_up_and_propose(self, tokens: Tensor, path: Tensor, n_acc: Tensor, bonus: Tensor,
                             features: Tensor, L: Tensor, cols: Tensor, temperature: float):
        """(h_root, next tree): the draft's catch-up on the accepted path, then the next round's proposal
        from there. cols = arange(W): the draft slots its attention covers. Static shapes: one graph."""
        J = path.shape[0]
        dev = tokens.device
        # slots L..L+J-1 get (f_{L+j}, x_{L+j+1}); always J rows (past n_acc they are overwritten later)
        nxt = torch.cat([tokens[path[1:]], bonus.view(1)])
        nxt = torch.where(torch.arange(J, device=dev) == n_acc - 1, bonus, nxt)
        slots = L + torch.arange(J, device=dev)
        mask = (cols[None, :] <= slots[:, None])[None, None]
        hid = self.draft(features[path][None], nxt[None], slots, mask)[0]
        h_root = hid.index_select(0, (n_acc - 1).view(1))[0]
        return h_root, self.tree_from(h_root, bonus, L + n_acc, cols, temperature)

    @staticmethod
    def _children(logq: Tensor, K: int, sampling: bool):
        """K children per row of logq [R, Vd] → (ids [R, K], slot scores [R, K]).

        Greedy: the top-K. Sampling: K draws *without replacement* from q (Gumbel-top-K: the order of
        the perturbed top-K is the order of sequential draws), which the tree rejection sampler needs.
        Sampling trees have a static shape (fixed draw ranks), so which nodes a tree keeps never depends
        on the values drawn: otherwise acceptance would be biased. Their scores are then unused."""
        if not sampling:
            top = torch.topk(logq, K, dim=-1)
            return top.indices, top.values
        gumbel = -torch.empty_like(logq).exponential_().log()
        ids = torch.topk(logq + gumbel, K, dim=-1).indices
        return ids, logq.gather(-1, ids)

    def tree_from(self, h_root: Tensor, root: Tensor, L: Tensor, cols: Tensor, temperature: float = 0.0):
        """The tree grown from `root` at slot L, whose children h_root (the draft's output at slot L-1)
        scores. cols = arange(W): the draft slots attended (W >= L + tree_slots)."""
        from speculative import make_tree
        sampling = temperature > 0
        d, p = self.draft, (self.sample_plan if sampling else self.plan)
        K, F = p.K, p.F
        dev = root.device
        scale = 1.0 / temperature if sampling else 1.0
        n_slots = self.tree_slots
        from speculative import prefix_and_tree_mask

        logq = torch.log_softmax(d.logits(h_root[None]).float() * scale, dim=-1)      # [1, Vd]
        ids, sc = self._children(logq, K, sampling)
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        toks, parents, scores = [zero, ids[0]], [zero, zero.expand(K)], [zero.float(), sc[0]]
        qs = [logq.exp()] if sampling else []
        q_of = [zero]                                          # candidate index of each q row
        prev_hidden, prev_parent = h_root[None], zero.expand(K)
        prev_anc = torch.zeros(1, n_slots, dtype=torch.bool, device=dev)
        base, n_new = 1, K
        for s in range(1, p.depth):
            if p.frontier is None:   # EAGLE-2: expand the F best candidates of the newest depth
                sel = torch.topk(scores[-1], F).indices
            else:
                sel = torch.tensor(p.frontier[s - 1], device=dev)
            f_idx = base + sel
            f_tok = toks[-1][sel]
            f_par = prev_parent[sel]
            own = (s - 1) * F + torch.arange(F, device=dev)
            anc = prev_anc[f_par] | (torch.arange(n_slots, device=dev)[None, :] == own[:, None])
            mask = prefix_and_tree_mask(L, cols, anc)[None, None]
            pos = (L - 1 + s).expand(F)
            hid = d(prev_hidden[f_par][None], d.to_target(f_tok)[None], L + own, mask, pos)[0]
            logq = torch.log_softmax(d.logits(hid).float() * scale, dim=-1)                  # [F, Vd]
            ids, sc = self._children(logq, K, sampling)
            toks.append(ids.flatten())
            parents.append(f_idx.repeat_interleave(K))
            scores.append((scores[-1][sel][:, None] + sc).flatten())
            if sampling:
                qs.append(logq.exp())
                q_of.append(f_idx)
            prev_hidden, prev_anc = hid, anc
            prev_parent = torch.arange(F, device=dev).repeat_interleave(K)
            base, n_new = base + n_new, F * K
        tok, par, score = torch.cat(toks), torch.cat(parents), torch.cat(scores)
        if p.keep is not None:
            keep = torch.tensor(p.keep, device=dev)
        else:
            # EAGLE-2 rerank (greedy only: sampling uses a static plan): the best N-1 by cumulative log q;
            # a child never outscores its parent and the stable sort puts the (earlier-numbered) parent
            # first on ties, so the set is ancestor-closed
            keep = torch.sort(-score[1:], stable=True).indices[:p.N - 1] + 1
        keep = torch.sort(keep).values
        inv = torch.zeros(tok.shape[0], dtype=torch.long, device=dev)
        inv = inv.index_copy(0, keep, torch.arange(1, p.N, device=dev))
        tokens = torch.cat([root.view(1), d.to_target(tok[keep])])
        parent = torch.cat([zero, inv[par[keep]]])
        valid = torch.ones(p.N, dtype=torch.bool, device=dev)
        q = qrow = None
        if sampling:
            q = d.to_target_probs(torch.cat(qs))
            # the q row each candidate's children were drawn from: padded static frontiers repeat a node,
            # and its children are the first row's (TreePlan numbers the first occurrence)
            q_idx = torch.cat(q_of)
            hit = q_idx[None, :] == torch.arange(tok.shape[0], device=dev)[:, None]
            first = torch.where(hit, torch.arange(q_idx.shape[0], device=dev), q_idx.shape[0]).amin(1)
            cand_qrow = torch.where(hit.any(1), first, -1)
            qrow = torch.cat([zero, cand_qrow[keep]])
        return make_tree(tokens, parent, valid, p.depth, K, q, qrow)

# --- training ---
# (losses and data format: owned by scripts/train_eagle.py's engineer; appended below this line)
# The data format and the EAGLE-1 objective. scripts/train_eagle.py drives them; they live here so that
# whoever changes the draft network sees, in the same file, what it is trained on.
#
# A data shard (safetensors) packs `n` sequences end to end:
#     tokens    int32   [total]        token ids in the target's vocabulary
#     hidden    bf16    [total, dim]   the target's final *normed* hidden state at each token (its feature)
#     loss_mask uint8   [total]        1 on assistant tokens (incl. their end-of-turn token), 0 elsewhere
#     offsets   int64   [n + 1]        sequence i is rows offsets[i]:offsets[i+1]
# Packing (not padding) keeps shards small; the trainer pads per batch.
#
# Alignment (EAGLE-1): draft position t reads (f_t, x_{t+1}) and predicts f_{t+1}, hence, through the
# frozen head, the token x_{t+2}. At decode time the draft only ever starts from a token the target has
# already produced inside the answer, so position t is trained iff x_{t+1} is an assistant token.


SHARD_KEYS = ("tokens", "hidden", "loss_mask", "offsets")


def pack_sequences(seqs) -> dict:
    """[(tokens [T] int, hidden [T, D], loss_mask [T] bool)] → the tensors of one shard."""
    lengths = [len(t) for t, _, _ in seqs]
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return {
        "tokens": torch.cat([torch.as_tensor(t, dtype=torch.int32) for t, _, _ in seqs]),
        "hidden": torch.cat([h.to(torch.bfloat16).cpu() for _, h, _ in seqs]).contiguous(),
        "loss_mask": torch.cat([torch.as_tensor(m, dtype=torch.uint8) for _, _, m in seqs]),
        "offsets": offsets,
    }


def unpack_sequences(tensors: dict) -> list:
    """The inverse of pack_sequences: [(tokens int64 [T], hidden bf16 [T, D], loss_mask bool [T])] (views)."""
    missing = [k for k in SHARD_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"shard lacks {', '.join(missing)}")
    off = tensors["offsets"].tolist()
    tok, hid, msk = tensors["tokens"].long(), tensors["hidden"], tensors["loss_mask"].bool()
    if off[-1] != len(tok) or len(hid) != len(tok) or len(msk) != len(tok):
        raise ValueError("shard tensors disagree in length")
    return [(tok[a:b], hid[a:b], msk[a:b]) for a, b in zip(off[:-1], off[1:])]


def pad_batch(seqs, device="cpu"):
    """Right-pad sequences to the longest: (features [B,T,D] bf16, tokens [B,T], loss_mask [B,T] bool).
    Right padding is harmless under causal attention: real positions never see the pads."""
    T = max(len(t) for t, _, _ in seqs)
    B, D = len(seqs), seqs[0][1].shape[-1]
    feats = torch.zeros(B, T, D, dtype=torch.bfloat16)
    toks = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, (t, h, m) in enumerate(seqs):
        n = len(t)
        feats[i, :n], toks[i, :n], mask[i, :n] = h, t, m
    return feats.to(device), toks.to(device), mask.to(device)


def draft_vocab_from_counts(counts: Tensor, n: int, keep_ids=()) -> Tensor:
    """The draft vocabulary: the `keep_ids` (stop tokens) plus the most frequent ids → d2t [n].
    A token outside it can never be drafted, so frequency in the training answers is what matters."""
    vocab = counts.numel()
    n = min(n, vocab)
    keep = [i for i in dict.fromkeys(int(k) for k in keep_ids) if 0 <= i < vocab][:n]
    score = counts.double().clone()
    score[keep] = float("inf")
    return torch.topk(score, n).indices          # most frequent first, as EagleDraft documents d2t


class UnrolledKV(nn.Module):
    """Stands in for the KV cache while training unrolled steps: step s's keys/values are appended to
    those of steps 1..s-1, so a query can attend to what the draft saw at decode time (see unrolled_mask).
    (A Module only because the attention's `kv_cache` slot holds Modules.)"""

    def __init__(self):
        super().__init__()
        self.k = self.v = None

    def update(self, input_pos, k: Tensor, v: Tensor):
        if self.k is not None:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v


def unrolled_mask(n: int, step: int, device) -> Tensor:
    """[1, 1, n, step*n] bool: at unrolled step s, row i stands for the draft at slot i+s-1 after s-1 of
    its own guesses. At decode time that query sees the true-feature slots 0..i (step 1's keys, causal)
    and its own chain's earlier guesses (row i of steps 2..s-1) plus itself: a diagonal in each later block."""
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device))
    eye = torch.eye(n, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * (step - 1), dim=1)[None, None]


def eagle_loss(draft, feats: Tensor, tokens: Tensor, loss_mask: Tensor, noise: float = 0.0,
               w_cls: float = 0.1, generator=None, unroll: int = 1) -> tuple:
    """EAGLE-1 objective on a padded batch. feats [B,T,D] (target features), tokens [B,T], loss_mask [B,T].

    loss = SmoothL1(f̂_{t+1}, f_{t+1}) + w_cls · CE(softmax(head(f_{t+1})), head(f̂_{t+1}))
    over positions whose input token x_{t+1} is an assistant token. The soft labels come from the same
    frozen head the draft uses (restricted to the draft vocabulary when it has one), so the draft is
    taught the target's whole next-token distribution, not only the sampled token. Uniform noise on the
    input features stands in for the error the draft's own predicted features carry at depth > 1.

    unroll > 1 also trains what the draft does at depth 2..unroll ("training-time test", as in HASS and
    EAGLE-3): step s feeds the draft its own step s-1 prediction f̂_{t+s-1} with the true token x_{t+s}
    and asks for f_{t+s}, attending to the true-feature context plus its own earlier guesses exactly as
    at decode time (UnrolledKV + unrolled_mask). Noise only blurs step 1's inputs; later steps carry the
    draft's real errors. The step losses are averaged.
    Returns (loss, {"reg": ..., "cls": ..., "acc": step-1 top-1 agreement on the draft vocab, "n": positions}).
    """
    n = feats.shape[1] - 1
    f_in = feats[:, :-1]
    if noise > 0:
        # the generator lives on the training device, so a resumed run replays the same noise
        u = torch.rand(f_in.shape, generator=generator, device=f_in.device)
        f_in = f_in + ((u - 0.5) * noise).to(f_in.dtype)
    kv = UnrolledKV() if unroll > 1 else None
    pos = torch.arange(n, device=feats.device)
    total = reg_sum = cls_sum = 0.0
    acc = torch.zeros((), device=feats.device)
    n1 = loss_mask[:, 1:].float().sum()
    for s in range(1, unroll + 1):
        if s > n:
            break
        # row i: input (f_{i+s-1} or its guess, x_{i+s}) → target f_{i+s}; rows past the end are padding
        pad = s - 1
        x_in = F.pad(tokens[:, s:], (0, pad))
        f_next = F.pad(feats[:, s:], (0, 0, 0, pad))
        w = F.pad(loss_mask[:, s:].float(), (0, pad))
        mask = unrolled_mask(n, s, feats.device) if kv is not None else None
        pred = draft(f_in, x_in, mask=mask, pos=pos + pad, kv=kv)
        # the head and the vocabulary-sized softmaxes dominate the cost: run them on trained rows only
        rows = w.flatten().nonzero().squeeze(1)
        p_v, f_v = pred.flatten(0, 1)[rows], f_next.flatten(0, 1)[rows]
        denom = float(max(rows.numel(), 1))
        reg = F.smooth_l1_loss(p_v.float(), f_v.float(), reduction="none").mean(-1).sum() / denom
        with torch.no_grad():
            target_logits = draft.logits(f_v).float()
            target_p = target_logits.softmax(-1)
        logp = draft.logits(p_v).float().log_softmax(-1)
        cls = -(target_p * logp).sum() / denom
        total = total + reg + w_cls * cls
        reg_sum, cls_sum = reg_sum + reg.detach(), cls_sum + cls.detach()
        if s == 1:
            with torch.no_grad():
                acc = (logp.argmax(-1) == target_logits.argmax(-1)).float().sum() / denom
        f_in = pred
    k = min(unroll, n)
    return total / k, {"reg": reg_sum / k, "cls": cls_sum / k, "acc": acc, "n": n1}


@torch.no_grad()
def chain_acceptance(draft, target_head, feats: Tensor, tokens: Tensor, starts, depth: int = 5,
                     window: Optional[int] = None) -> Tensor:
    """Simulated greedy chain drafting on one recorded sequence: for each start t, the draft runs
    autoregressively on its *own* features and tokens for `depth` steps from (f_0..f_t, x_1..x_{t+1}), as at
    decode time, and step k is accepted while its token equals the target's greedy token after the accepted
    prefix. The target's features are only known along the recorded tokens, so a chain whose accepted
    tokens leave the recording is stopped there (a lower bound; exact for greedy self-distilled data).

    feats [T, D], tokens [T] (one sequence), starts: positions t with t + 1 < T. target_head maps a feature to
    the target's full-vocabulary logits. Returns accepted draft tokens per start [len(starts)] (0..depth);
    τ = 1 + mean (the target always adds one token per verification).
    window: the draft sees only the last `window` positions before each start (RoPE is relative, so this
    only drops far context; it bounds the cost, which otherwise grows with start × depth).
    """
    device = feats.device
    T = feats.shape[0]
    greedy = target_head(feats).argmax(-1)            # greedy[t] = target's choice of x_{t+1}
    starts = [int(s) for s in starts if int(s) + 1 < T]
    n = len(starts)
    first = [max(0, s + 1 - window) if window else 0 for s in starts]
    L = max(s + 1 - a for s, a in zip(starts, first)) + depth
    D = feats.shape[-1]
    f = torch.zeros(n, L, D, dtype=feats.dtype, device=device)
    x = torch.zeros(n, L, dtype=torch.long, device=device)
    for i, (s, a) in enumerate(zip(starts, first)):
        f[i, :s + 1 - a], x[i, :s + 1 - a] = feats[a:s + 1], tokens[a + 1:s + 2]
    last = torch.tensor([s - a for s, a in zip(starts, first)], device=device)
    rows = torch.arange(n, device=device)
    accepted = torch.zeros(n, dtype=torch.long, device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    d2t = getattr(draft, "d2t", None)
    for k in range(1, depth + 1):
        h = draft(f, x)[rows, last]                        # predicted f_{t+k}
        y = draft.logits(h).argmax(-1)
        if d2t is not None:
            y = d2t[y]
        # the target's greedy token after x_{t+1}..x_{t+k} (valid only while those are the recorded tokens)
        pos = (last.new_tensor(starts) + k).clamp(max=T - 1)
        ok = alive & (last.new_tensor(starts) + k < T) & (y == greedy[pos])
        accepted += ok.long()
        # continuing past step k needs the target's feature after y, i.e. y must be the recorded token too
        nxt = (last.new_tensor(starts) + k + 1).clamp(max=T - 1)
        alive = ok & (last.new_tensor(starts) + k + 1 < T) & (tokens[nxt] == y)
        if k < depth:
            f[rows, last + 1] = h.to(f.dtype)
            x[rows, last + 1] = y
            last = last + 1
    return accepted
