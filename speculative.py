"""What every drafter shares: sampling, tree buffers, target verification, acceptance, KV compaction.

Sampling lives here (not in generate.py) because lossless rejection sampling must turn logits into the
*same* distribution p that plain decoding samples from: one function, used by both paths.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import model as M


def logits_to_probs(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None) -> Tensor:
    """The target distribution p at temperature > 0 with optional top-k and top-p (nucleus) truncation.
    Works on [..., V] and keeps static shapes (masking, not slicing), so it compiles once."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the top token is always kept)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample_from(probs: Tensor) -> Tensor:
    """One draw per row of probs [..., V] → [...] without a host sync (Gumbel-style exponential trick)."""
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1)


def sample(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> Tensor:
    """Next token from logits [..., V]: argmax when temperature == 0, else a draw from logits_to_probs."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    return sample_from(logits_to_probs(logits, temperature, top_k, top_p))


# =====================================================================================================
# Draft trees
# =====================================================================================================
#
# A round verifies a tree of N tokens in one target forward. Node 0 is the root: the last token already
# chosen (sampled or accepted) but not yet in the target's cache, at cache slot L (= tokens in the cache).
# Node i sits at cache slot L + i and RoPE position L + depth[i]; it attends to the whole prefix (slots
# < L) and to its own ancestors (itself included). Nodes are numbered parents-first, siblings in the
# order the drafter proposed them (for sampling: the order they were drawn from q).

import contextlib  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
import time  # noqa: E402


@dataclass
class Tree:
    tokens: Tensor                       # [N] target ids
    parent: Tensor                       # [N] parent node (the root is its own parent)
    depth: Tensor                        # [N] 0 for the root
    valid: Tensor                        # [N] False for padding nodes (never accepted)
    mask: Tensor                         # [N, N] bool, ancestor-or-self (padding rows: self only)
    paths: Tensor                        # [N, max_depth + 1] node on i's root path at each depth (≤ depth[i])
    children: Tensor                     # [N, C] children in proposal order, -1 = none
    max_depth: int
    q: Optional[Tensor] = None           # [M, V] draft distribution at expanded nodes (sampling only)
    qrow: Optional[Tensor] = None        # [N] row of q for each node, -1 if the node was not expanded


def make_tree(tokens: Tensor, parent: Tensor, valid: Tensor, max_depth: int, max_children: int,
              q: Optional[Tensor] = None, qrow: Optional[Tensor] = None) -> Tree:
    """Derive depths, the ancestor mask, root paths and the children table from parent pointers, with
    tensor ops of static shape (no host sync). Invalid nodes become isolated padding."""
    N = tokens.shape[0]
    dev = tokens.device
    ar = torch.arange(N, device=dev)
    valid = valid.clone()
    valid[0] = True
    parent = torch.where(valid, parent, ar)
    parent = torch.where(ar == 0, torch.zeros_like(parent), parent)
    eye = torch.eye(N, dtype=torch.bool, device=dev)
    anc = eye.clone()
    for _ in range(max_depth):
        anc = eye | (anc[parent] & (valid & (ar > 0))[:, None])
    depth = anc.sum(1) - 1
    # paths[i, d] = the ancestor of i at depth d (the root for d > depth[i], harmless padding)
    # (a sum over the one match, not an argmax: compiled, a tied argmax over a row of zeros returned an
    # index past the row's end now and then)
    at_depth = anc[:, None, :] & (depth[None, None, :] == torch.arange(max_depth + 1, device=dev)[None, :, None])
    paths = (at_depth.long() * ar).sum(-1)
    # children[p, r] = r-th child of p in proposal order
    sib = (parent[:, None] == parent[None, :]) & (ar[None, :] < ar[:, None]) & valid[None, :] & (ar[None, :] > 0)
    rank = sib.sum(1)
    ok = valid & (ar > 0) & (rank < max_children)
    slot = torch.where(ok, parent * max_children + rank, torch.full_like(rank, N * max_children))
    children = torch.full((N * max_children + 1,), -1, dtype=torch.long, device=dev)
    children = children.scatter(0, slot, torch.where(ok, ar, torch.full_like(ar, -1)))
    children = children[:-1].view(N, max_children)
    return Tree(tokens, parent, depth, valid, anc, paths, children, max_depth, q, qrow)


def chain_tree(tokens: Tensor, valid: Tensor, q: Optional[Tensor] = None) -> Tree:
    """A chain root → d1 → d2 … (separate draft model, prompt lookup)."""
    N = tokens.shape[0]
    parent = (torch.arange(N, device=tokens.device) - 1).clamp(min=0)
    valid = torch.cumprod(valid.long(), 0).bool()        # a chain stops at its first invalid node
    qrow = None if q is None else torch.arange(N, device=tokens.device)
    return make_tree(tokens, parent, valid, N - 1, 1, q, qrow)


# =====================================================================================================
# Verification: one target forward over the tree
# =====================================================================================================

def tree_attention_mask(tree: Tree, L: Tensor, width: int) -> Tensor:
    """[1, 1, N, width] bool over cache slots 0..width-1 (width >= L + N): prefix slots < L, then the
    tree's ancestor mask at slots L.. ."""
    cols = torch.arange(width, device=tree.tokens.device)
    return M.narrow_mask(_tree_mask(tree, L, cols)[None, None], width)


def _tree_mask(tree: Tree, L: Tensor, cols: Tensor) -> Tensor:
    return prefix_and_tree_mask(L, cols, tree.mask)


def prefix_and_tree_mask(L: Tensor, cols: Tensor, anc: Tensor) -> Tensor:
    """[R, W] bool over cache slots cols (= 0..W-1): every slot < L, and slots L..L+n-1 as anc [R, n] says.
    A gather rather than an index_copy into an expanded prefix, which Inductor wrote through the
    expansion's shared storage (every row got every row's tree columns)."""
    n = anc.shape[1]
    rel = cols - L
    in_tree = (rel >= 0) & (rel < n)
    return (rel < 0)[None, :] | (in_tree[None, :] & anc.index_select(1, rel.clamp(0, n - 1)))


def target_tree_forward(target, tokens: Tensor, input_pos: Tensor, mask: Tensor, pos: Tensor):
    """The target's forward over a tree (what --measure-verify times; compiled once per tree budget)."""
    logits, hidden = target(tokens[None], input_pos, mask, pos, return_hidden=True)
    return logits[0], hidden[0]


def verify(target, tree: Tree, L: Tensor, forward=target_tree_forward, Lh: Optional[int] = None):
    """One target forward over the tree at cache slots L..L+N-1 → (logits [N, V], features [N, D]).
    Lh: L on the host, when known, bounds the slots attended (model.visible_width)."""
    N = tree.tokens.shape[0]
    input_pos = L + torch.arange(N, device=tree.tokens.device)
    S = target.max_seq_length
    width = S if Lh is None else M.visible_width(Lh + N, S, tree.tokens.device)
    mask = tree_attention_mask(tree, L, width)
    return forward(target, tree.tokens, input_pos, mask, L + tree.depth)


def verify_and_accept(target, tree: Tree, L: Tensor, cols: Tensor, temperature: float = 0.0,
                      top_k: Optional[int] = None, top_p: Optional[float] = None):
    """A whole verification, as one compiled graph: the target's forward over the tree (slots L..L+N-1,
    attending to slots 0..W-1, W = cols.shape[0], cols = arange(W)), acceptance (greedy, or lossless
    rejection sampling when temperature > 0), and the move of the accepted path's K/V rows into place.

    Returns (path [max_depth+1], n_accepted 0-dim (root included), bonus 0-dim, features [N, D],
    summary): summary = [n_accepted, tokens along the path..., bonus], what the host reads (the round's
    one sync). Doing all of this in one graph matters on a CPU: as separate eager ops, acceptance and
    compaction cost about as much as the draft's whole proposal."""
    N = tree.tokens.shape[0]
    slots = L + torch.arange(N, device=cols.device)
    mask = _tree_mask(tree, L, cols)[None, None]
    logits, feats = target(tree.tokens[None], slots, mask, L + tree.depth, return_hidden=True)
    logits, feats = logits[0], feats[0]
    if temperature > 0:
        path, n_acc, bonus = accept_sample(tree, logits, temperature, top_k, top_p)
    else:
        path, n_acc, bonus = accept_greedy(tree, logits)
    compact_kv(target_caches(target), L, path)
    summary = torch.cat([n_acc.view(1), tree.tokens[path], bonus.view(1)])
    return path, n_acc, bonus, feats, summary


def width_cols(width: int, device) -> Tensor:
    """arange(width) with its length marked dynamic: how a compiled step learns how many cache slots to
    attend to (model.visible_width) without recompiling for every width."""
    cols = torch.arange(width, device=device)
    torch._dynamo.maybe_mark_dynamic(cols, 0)
    return cols


def accept_greedy(tree: Tree, logits: Tensor):
    """Longest root path whose every token is the target's argmax after its parent, plus a bonus token.
    Returns (path [max_depth+1] node ids, n_accepted (root included) 0-dim, bonus token 0-dim)."""
    # fp32 copy: exact, and eager bf16 argmax over [12, 49152] took 1.1 ms on this CPU against 0.2 ms
    tgt = torch.argmax(logits.float(), dim=-1)
    root = torch.arange(tree.tokens.shape[0], device=logits.device) == 0
    correct = root | (tree.valid & (tree.tokens == tgt[tree.parent]))
    ok = correct
    for _ in range(tree.max_depth):
        ok = correct & ok[tree.parent]
    best = torch.argmax(torch.where(ok, tree.depth, -1)).view(1)
    # index_select, not [best]: indexing with a 0-dim tensor reads its value on the host (a sync, and a
    # graph break when compiled)
    return tree.paths.index_select(0, best)[0], tree.depth.index_select(0, best)[0] + 1, tgt.index_select(0, best)[0]


def accept_sample(tree: Tree, logits: Tensor, temperature: float, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
    """Lossless recursive rejection sampling over the tree (SpecInfer / EAGLE multi-round).

    At the current node, p is the target's distribution (logits_to_probs: the one plain decoding samples
    from) and q the draft distribution its children were drawn from, without replacement, in order.
    Try children in order: accept child x with probability min(1, p(x)/q(x)); on rejection
    p ← norm(max(p − q, 0)) and x's mass is removed from q (renormalised), because the next child was drawn
    from q without x. Accepting moves down the tree; when all children are rejected (or there are none)
    the bonus token is drawn from the current p. Fixed loop counts and torch.where instead of branches:
    no host sync. Returns (path, n_accepted, bonus) like accept_greedy.

    Also runs B independent rounds at once (logits [B, N, V], tokens [B, N], q [B, M, V]; the shape
    buffers may be shared): the statistical test draws its 10^4-10^5 samples that way.
    """
    single = logits.dim() == 2
    P = logits_to_probs(logits if not single else logits[None], temperature, top_k, top_p)
    B, N, V = P.shape
    dev = P.device

    def batched(x, dims):
        if x is None:
            return None
        return (x if x.dim() == dims else x[None]).expand(B, *x.shape[-(dims - 1):])

    tokens, children = batched(tree.tokens, 2), batched(tree.children, 3)
    Q, qrow = batched(tree.q, 3), batched(tree.qrow, 2)
    C = children.shape[-1]
    bi = torch.arange(B, device=dev)
    cur = torch.zeros(B, dtype=torch.long, device=dev)
    n_acc, bonus = cur + 1, cur
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    path = [cur]
    for _ in range(tree.max_depth + 1):
        p = P[bi, cur]
        if Q is not None:
            qr = qrow[bi, cur]
            q = Q[bi, qr.clamp(min=0)] * (qr >= 0)[:, None]
        else:
            q = torch.zeros_like(p)
        moved = torch.zeros_like(done)
        nxt = cur
        for j in range(C):
            c = children[bi, cur, j]
            cc = c.clamp(min=0)
            x = tokens[bi, cc][:, None]
            px, qx = p.gather(1, x)[:, 0], q.gather(1, x)[:, 0]
            # a child drawn with q(x) = 0 cannot have been drawn: treat it as absent
            live = (c >= 0) & (qx > 0) & ~moved & ~done
            acc = live & (torch.rand(B, device=dev) * qx < px)
            rej = (live & ~acc)[:, None]
            resid = (p - q).clamp(min=0)
            rs = resid.sum(-1, keepdim=True)
            p = torch.where(rej & (rs > 0), resid / rs.clamp(min=1e-30), p)
            q_wo = q.scatter(1, x, 0.0)
            q = torch.where(rej, q_wo / q_wo.sum(-1, keepdim=True).clamp(min=1e-30), q)
            nxt = torch.where(acc, cc, nxt)
            moved = moved | acc
        stop_here = ~moved & ~done
        bonus = torch.where(stop_here, sample_from(p), bonus)
        done = done | stop_here
        n_acc = n_acc + moved.long()
        cur = nxt
        path.append(cur)
    path = torch.stack(path[:tree.max_depth + 1], -1)
    if single:
        return path[0], n_acc[0], bonus[0]
    return path, n_acc, bonus


def compact_kv(caches, L: Tensor, path: Tensor) -> None:
    """Move the accepted path's K/V rows (slots L + path[j]) to slots L + j. Always the full path length,
    so shapes are static; rows past the accepted length land on slots that are overwritten later."""
    src = L + path
    dst = L + torch.arange(path.shape[0], device=path.device)
    for c in caches:
        c.k_cache.index_copy_(2, dst, c.k_cache.index_select(2, src))
        c.v_cache.index_copy_(2, dst, c.v_cache.index_select(2, src))


def target_caches(target):
    return [layer.attention.kv_cache for layer in target.layers]


# =====================================================================================================
# Other drafters on the same verify path
# =====================================================================================================

class DraftModelDrafter:
    """A separate small LM drafts a chain of k tokens (the gpt-fast way), one cached step at a time.

    The draft's cache holds tokens 0..Ld-1. A round first feeds it the tokens it has not seen (the new
    root, and the last draft token when the whole chain was accepted), then drafts k tokens. At
    temperature > 0 each token is drawn from q = softmax(draft logits / T), recorded for verification."""

    method = "draft"

    def __init__(self, draft_model, k: int = 4, compile: bool = False):
        self.model, self.k = draft_model, k
        self.N, self.max_depth = k + 1, k
        self.step = _draft_lm_step
        if compile:
            from generate import compile_step
            self.step = compile_step(_draft_lm_step, draft_model, draft_model.tok_embeddings.weight.device)
        self.pending: list = []

    def setup(self, max_seq_length: int, dtype, device) -> None:
        need = max_seq_length + self.k + 2
        if self.model.max_seq_length < need or self.model.max_batch_size != 1:
            self.model.setup_caches(1, need, dtype)

    def caches(self):
        return target_caches(self.model)

    def prefill(self, prompt: Tensor, features: Tensor, first: Tensor) -> None:
        T = prompt.shape[0]
        self.model(prompt[None], torch.arange(T, device=prompt.device))
        self.Ld = torch.tensor(T, device=prompt.device)
        self.pending = [first.view(())]

    def propose(self, root: Tensor, L: Tensor, temperature: float = 0.0, Lh: Optional[int] = None):
        toks, qs = [root.view(())], []
        V = None
        for t in self.pending:                # 1 or 2 tokens the draft has not seen yet
            logits = self.step(self.model, t, self.Ld)
            self.Ld = self.Ld + 1
        for i in range(self.k):
            if temperature > 0:
                q = logits_to_probs(logits, temperature)
                nxt = sample_from(q)
                qs.append(q)
            else:
                nxt = torch.argmax(logits, dim=-1)
            toks.append(nxt)
            if i + 1 < self.k:
                logits = self.step(self.model, nxt, self.Ld + i)
        tokens = torch.stack(toks)
        q = None
        if qs:
            q = torch.stack(qs + [torch.zeros_like(qs[0])])
            V = self.target_vocab
            if q.shape[-1] < V:     # a draft with a smaller vocabulary puts no mass on the rest
                q = torch.nn.functional.pad(q, (0, V - q.shape[-1]))
        return chain_tree(tokens, torch.ones_like(tokens, dtype=torch.bool), q)

    def update(self, tree, path, n_acc: Tensor, bonus: Tensor, features, L, Lh: Optional[int] = None,
               n: Optional[int] = None) -> None:
        """After a round: n_acc (0-dim tensor; n, the same on the host) tokens were accepted, root included."""
        # the draft saw root, d1..d_{k-1} at Ld_round.. ; d_j is right for j < n
        a = (int(n_acc) if n is None else n) - 1
        self.Ld = L + 1 + min(a, self.k - 1)
        self.pending = ([tree.tokens[self.k].view(())] if a == self.k else []) + [bonus.view(())]


def _draft_lm_step(model, token: Tensor, pos: Tensor) -> Tensor:
    return model(token.view(1, 1), pos.view(1))[0, -1]


class NgramIndex:
    """The token context and, for n = min_n..max_n, where each n-gram last occurred with a token after it:
    prompt lookup's "most recent earlier occurrence of the last n-gram" in O(max_n) per query, not a scan
    of the context every round."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        self.tokens: list = []
        self.last: dict = {}

    def reset(self, ids) -> None:
        self.tokens, self.last = [], {}
        self.extend(ids)

    def extend(self, ids) -> None:
        ctx = self.tokens
        old = len(ctx)
        ctx.extend(int(t) for t in ids)
        # the n-grams ending just before position e (e >= old) now have a successor, ctx[e]
        for e in range(max(old, 1), len(ctx)):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                self.last[tuple(ctx[e - n:e])] = e

    def match(self, k: int) -> list:
        """Up to k tokens that followed the latest earlier occurrence of the context's last n-gram (longest
        n first); [] if none occurred."""
        ctx = self.tokens
        for n in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            e = self.last.get(tuple(ctx[-n:]))
            if e is not None:
                return ctx[e:e + k]
        return []


class LookupDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n-gram (longest n
    first) and propose the k tokens that followed it. No model; q is a point mass on the proposal."""

    method = "lookup"

    def __init__(self, k: int = 8, max_ngram: int = 3, min_ngram: int = 1):
        self.k = k
        self.N, self.max_depth = k + 1, k
        self.ngrams = NgramIndex(max_ngram, min_ngram)

    def setup(self, max_seq_length, dtype, device) -> None:
        pass

    def caches(self):
        return []

    def prefill(self, prompt, features, first) -> None:
        self.ngrams.reset(prompt.tolist() + [int(first)])

    def propose(self, root: Tensor, L, temperature: float = 0.0, Lh: Optional[int] = None):
        prop = self.ngrams.match(self.k)
        if not prop:
            return None
        dev = root.device
        toks = torch.zeros(self.N, dtype=torch.long, device=dev)
        toks[1:1 + len(prop)] = torch.tensor(prop, device=dev)
        toks[0] = root
        valid = torch.arange(self.N, device=dev) <= len(prop)
        q = None
        if temperature > 0:
            q = torch.nn.functional.one_hot(torch.roll(toks, -1), self.target_vocab).float()
            q = q * torch.roll(valid, -1)[:, None]
        return chain_tree(toks, valid, q)

    def update(self, tree, path, n_acc, bonus, features, L, Lh: Optional[int] = None, n=None) -> None:
        pass        # speculative_generate feeds the accepted tokens to self.ngrams


class LookupBranchDrafter:
    """An EAGLE drafter whose greedy trees get k more nodes from prompt lookup (NgramIndex) whenever the
    context's last n-gram (n >= min_ngram) occurred before: the tokens that followed it are walked down
    EAGLE's tree as far as the tree already has them, and the next k hang below the deepest node reached
    (below the root when the tree lacks even the first).

    The draft and the lookup fail in different places. A 4-token EAGLE tree accepts at most 3 draft
    tokens, while answers that repeat their prompt or themselves (names, code, lists) give lookup chains
    that are accepted whole: grafted, 4 more nodes reach depth 7. Compiled fp32 on an AMD EPYC (2026-12-04,
    10 MT-bench prompts after a warm-up one, 256 tokens, one process, interleaved; a /tmp script): EAGLE's
    4-token tree alone 1.65x plain decoding at τ 2.09; with k = 4 and min_ngram = 3 1.90x at τ 2.70 (lookup
    nodes in 27% of rounds); min_ngram = 2 1.80x at τ 2.74 (36%); k = 6, min_ngram = 3 (a 10-row verify:
    39.7 ms against 31.2 for 8 rows and 22.9 for 4) 1.73x at τ 2.78. An ungrafted branch from the root
    with k = 6 reached τ 2.73 but 1.87x (another run of the same script, EAGLE alone 1.71x).

    A round with lookup tokens verifies N + k nodes, one without verifies N: two compiled verify graphs,
    both compiled on the first greedy round. The grafting runs inside the larger graph (tensor ops: no
    host sync). The draft's catch-up graph sees one shape: the tokens, features and path of a round
    without lookup tokens are padded to the larger tree's (rows past n_accepted are never read). At
    temperature > 0 the trees are EAGLE's alone: point-mass nodes would need their own q rows in the
    rejection sampler."""

    method = "eagle"

    def __init__(self, eagle, k: int = 4, min_ngram: int = 3, max_ngram: int = 3):
        self.eagle, self.k = eagle, k
        self.ngrams = NgramIndex(max_ngram, min_ngram)
        self.N = eagle.N + k
        self.tree_depth = eagle.plan.depth              # greedy trees (sampling ones never get lookup nodes)
        self.max_depth = max(eagle.max_depth, self.tree_depth + k)
        eagle.max_depth = self.max_depth                # the draft's cache must hold a catch-up this long
        self.branch_rounds = 0
        self.small_step, self.large_step = verify_and_accept, verify_with_lookup
        self._warm = False
        self._prop = None
        self._tokens = None

    def __getattr__(self, name):
        # what callers read off an EAGLE drafter (plan, draft, verify_template, verify_cost)
        if name == "eagle":
            raise AttributeError(name)
        return getattr(self.eagle, name)

    def setup(self, max_seq_length: int, dtype, device) -> None:
        self.eagle.target_vocab = self.target_vocab
        self.eagle.setup(max_seq_length, dtype, device)

    def caches(self):
        return self.eagle.caches()

    def prefill(self, prompt: Tensor, features: Tensor, first: Tensor) -> None:
        self.eagle.prefill(prompt, features, first)
        self.ngrams.reset(prompt.tolist() + [int(first)])
        self.branch_rounds = 0

    def propose(self, root: Tensor, L: Tensor, temperature: float = 0.0, Lh: Optional[int] = None):
        """EAGLE's tree; the lookup tokens for this round (if any) wait in self._prop for verify_step."""
        tree = self.eagle.propose(root, L, temperature, Lh)
        prop = self.ngrams.match(self.tree_depth + self.k) if temperature == 0 else []
        self._prop = self._lookup_tensors(prop, root.device) if prop else None
        self.branch_rounds += bool(prop)
        return tree

    def _lookup_tensors(self, prop: list, device):
        P = self.tree_depth + self.k
        toks = torch.zeros(P, dtype=torch.long, device=device)
        toks[:len(prop)] = torch.tensor(prop, device=device)
        return toks, torch.tensor(len(prop), device=device)

    def verify_step(self, target, tree: Tree, L: Tensor, cols: Tensor, temperature: float = 0.0, *topk_topp):
        """The compiled verify for this round. The first greedy round also runs the other graph once (at
        the same slots, which this round's verify then overwrites), so that neither compiles later, when
        speculative_generate no longer checks guards."""
        if not self._warm and temperature == 0:
            self._warm = True
            if self._prop is None:
                self.large_step(target, tree, *self._lookup_tensors([0], L.device), self.k, self.max_depth,
                                L, cols, temperature, *topk_topp)
            else:
                self.small_step(target, tree, L, cols, temperature, *topk_topp)
        if self._prop is None:
            self._tokens = tree.tokens
            return self.small_step(target, tree, L, cols, temperature, *topk_topp)
        *out, self._tokens = self.large_step(target, tree, *self._prop, self.k, self.max_depth, L, cols,
                                             temperature, *topk_topp)
        return tuple(out)

    def update(self, tree, path: Tensor, n_acc: Tensor, bonus: Tensor, features: Tensor, L: Tensor,
               Lh: Optional[int] = None, n: Optional[int] = None) -> None:
        tokens = self._tokens if self._tokens is not None else tree.tokens
        pad = self.N - tokens.shape[0]
        if pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad))
            features = torch.nn.functional.pad(features, (0, 0, 0, pad))
        if path.shape[0] < self.max_depth + 1:
            path = torch.nn.functional.pad(path, (0, self.max_depth + 1 - path.shape[0]))
        self._tokens = None
        self.eagle.update(replace(tree, tokens=tokens), path, n_acc, bonus, features, L, Lh, n)


def graft_lookup(tree: Tree, prop: Tensor, n_prop: Tensor, k: int, max_depth: int) -> Tree:
    """tree plus k nodes from a lookup proposal prop [P] (n_prop valid, P >= tree.max_depth + k): follow
    prop down the tree while the tree has its tokens, hang the next k below the deepest node reached
    (static shapes, no host sync; EAGLE's siblings are distinct tokens, so at most one child matches)."""
    n = tree.tokens.shape[0]
    dev = tree.tokens.device
    ar = torch.arange(n, device=dev)
    cur = torch.zeros((), dtype=torch.long, device=dev)
    reached = torch.zeros((), dtype=torch.long, device=dev)
    going = torch.ones((), dtype=torch.bool, device=dev)
    for d in range(tree.max_depth):
        hit = tree.valid & (ar > 0) & (tree.parent == cur) & (tree.tokens == prop[d]) & (n_prop > d)
        going = going & hit.any()
        cur = torch.where(going, (hit.long() * ar).sum(), cur)
        reached = reached + going.long()
    j = torch.arange(k, device=dev)
    at = reached + j
    toks = prop.index_select(0, at.clamp(max=prop.shape[0] - 1))
    parent = torch.where(j == 0, cur, n - 1 + j)
    return make_tree(torch.cat([tree.tokens, toks]), torch.cat([tree.parent, parent]),
                     torch.cat([tree.valid, at < n_prop]), max_depth, tree.children.shape[1] + 1)


def verify_with_lookup(target, tree: Tree, prop: Tensor, n_prop: Tensor, k: int, max_depth: int, L: Tensor,
                       cols: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                       top_p: Optional[float] = None):
    """graft_lookup, then verify_and_accept, as one graph; also returns the grafted tree's tokens (what
    the draft's catch-up reads along the accepted path)."""
    grafted = graft_lookup(tree, prop, n_prop, k, max_depth)
    return (*verify_and_accept(target, grafted, L, cols, temperature, top_k, top_p), grafted.tokens)


# =====================================================================================================
# The speculative loop
# =====================================================================================================

def _plain_step(target, token: Tensor, pos: Tensor, mask: Optional[Tensor] = None):
    logits, hidden = target(token.view(1, 1), pos.view(1), mask, return_hidden=True)
    return logits[0, -1], hidden[0, -1]


@torch.no_grad()
def speculative_generate(target, drafter, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                         top_k: Optional[int] = None, top_p: Optional[float] = None, stop_ids=(),
                         callback=None) -> tuple:
    """Generate with draft-then-verify rounds; the output is the target's own (greedy: token for token).

    prompt: [T] (or [1, T]) token ids. Returns (new_tokens, stats): new_tokens ends at the first stop id
    (included), after max_new_tokens, or when the cache is full (at most max_seq_length - T new tokens).
    stats: rounds (target forwards after prefill), mean_accepted (τ: tokens per round, bonus included),
    accept_hist (rounds by number of draft tokens accepted, index 0..max_depth), new_tokens,
    time_to_first_token_s, decode_s, decode_tokens_per_s.
    callback(ids) is called once per round with the round's new tokens.
    """
    if prompt.dim() == 2:
        prompt = prompt[0]
    T = prompt.shape[0]
    dev = prompt.device
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    cap = target.args.max_position_embeddings
    if target.max_batch_size != 1 or target.max_seq_length < min(cap, T + max_new_tokens + drafter.N):
        target.setup_caches(1, min(cap, 256 * -(-(T + max_new_tokens + drafter.N) // 256)))
    S = target.max_seq_length
    if T >= S:
        raise ValueError(f"prompt of {T} tokens does not fit a cache of {S} slots")
    limit = min(max_new_tokens, S - T)
    dtype = target.layers[0].attention.kv_cache.k_cache.dtype
    drafter.target_vocab = target.args.vocab_size
    drafter.setup(S, dtype, dev)
    step = getattr(drafter, "verify_step", verify_and_accept)
    plain = getattr(drafter, "plain_forward", _plain_step)
    stop = set(int(s) for s in stop_ids)
    out: list = []

    def emit(ids: list) -> bool:
        """Append ids up to a stop id / the limit; True when generation is over."""
        take = []
        for t in ids:
            take.append(t)
            if t in stop or len(out) + len(take) >= limit:
                break
        out.extend(take)
        if callback is not None and take:
            callback(take)
        return len(out) >= limit or (bool(take) and take[-1] in stop)

    t0 = time.perf_counter()
    # prefill: only the last position needs logits (a [T, 49152] head would dominate a short prompt)
    hidden = target.hidden(prompt[None], torch.arange(T, device=dev), target.causal_rows(0, T))
    root = sample(target.output(hidden[0, -1]), temperature, top_k, top_p)
    drafter.prefill(prompt, hidden[0], root)
    finished = emit([int(root)])
    ngrams = getattr(drafter, "ngrams", None)
    t_first = time.perf_counter()

    L = torch.tensor(T, device=dev)
    Lh = T
    rounds, accepted, hist = 0, 0, [0] * (drafter.max_depth + 1)
    speculating = True
    # After the first verified round every compiled step has run with this target, drafter and temperature:
    # from then on their guards are skipped (see generate.skip_guards).
    steady, skipping = contextlib.ExitStack(), False
    compiled = step is not verify_and_accept
    with steady:
        while not finished:
            tree = None
            if speculating and Lh + drafter.N <= S:
                tree = drafter.propose(root, L, temperature, Lh)
            else:
                speculating = drafter.method == "lookup" and Lh + drafter.N <= S
            if tree is None:
                # no proposal (lookup miss) or the tree no longer fits before the cache end: one plain step
                with contextlib.ExitStack() as guarded:
                    if skipping:     # first used late (cache end, lookup miss): check its guards
                        guarded.enter_context(torch.compiler.set_stance("default"))
                    lg, _ = plain(target, root, L, target.causal_rows(Lh, Lh + 1))
                root = sample(lg, temperature, top_k, top_p)
                ids, n = [int(root)], 1
                hist[0] += 1
                if drafter.method != "lookup":
                    speculating = False      # the draft's cache is not kept up to date any more
            else:
                cols = width_cols(M.visible_width(Lh + drafter.N, S, dev), dev)
                path, n_acc, bonus, feats, summary = step(target, tree, L, cols, temperature, top_k, top_p)
                host = summary.tolist()                                       # the round's one sync
                n = host[0]
                ids = host[2:1 + n] + [host[-1]]
                hist[n - 1] += 1
                drafter.update(tree, path, n_acc, bonus, feats, L, Lh, n)
                root = bonus
                if compiled and not skipping:
                    from generate import skip_guards
                    steady.enter_context(skip_guards())
                    skipping = True
            rounds += 1
            accepted += n
            Lh += n
            L = L + n
            finished = emit(ids)
            if ngrams is not None:
                ngrams.extend(ids)
            if Lh >= S:
                finished = True
    t_end = time.perf_counter()
    decode_s = t_end - t_first
    stats = {"rounds": rounds, "mean_accepted": accepted / rounds if rounds else 0.0, "accept_hist": hist,
             "new_tokens": len(out), "prompt_tokens": T, "time_to_first_token_s": t_first - t0,
             "decode_s": decode_s,
             "decode_tokens_per_s": (len(out) - 1) / decode_s if decode_s > 0 and len(out) > 1 else 0.0,
             "method": drafter.method, "tree_tokens": drafter.N}
    if hasattr(drafter, "branch_rounds"):
        stats["lookup_rounds"] = drafter.branch_rounds          # rounds whose tree had lookup nodes
    return out, stats


# =====================================================================================================
# Building a drafter; choosing the tree budget
# =====================================================================================================

# Measured on this 2-core CPU (SmolLM2-135M, bf16, eager, 1 thread, busy machine): verify cost over n
# tree tokens relative to n = 1 is ~1.0 up to n = 4, 1.3 at 8-12, 1.7 at 24, 2.1 at 32, 3.4 at 64, so
# GPU-sized trees (60 tokens) would eat the gain; `pick_tree_tokens` on that curve picks 12.
DEFAULTS = {"dynamic": dict(depth=5, topk=4, tokens=12), "static": dict(depth=5, topk=4, tokens=12),
            "chain": dict(depth=4, topk=1, tokens=5)}
# A bf16/fp16 target on a CPU with AMX (Intel Xeon, Sapphire Rapids on) verifies on the matrix units, whose
# tiles are 16 rows: a 16-row matmul costs what 12 rows cost (bf16 linears of SmolLM2's shapes, eager: 19.3 ms
# at 12 rows, 20.6 at 16, 26.5 at 24). On 8 MT-bench prompts (compiled bf16, int8 draft, one process) depth 6 /
# 16 tokens gave τ 2.49 at 43.3 ms a round against 2.41 at 42.2 ms for the 12-token tree (2.09x vs 2.08x plain
# decoding), and 24 tokens τ 2.56 but 54.4 ms (1.71x). Without AMX (AMD EPYC: AVX512-BF16 dot products) bf16
# pays per row like fp32: there the same 8 prompts gave 1.32x at τ 2.59 with 16 tokens, 1.61x at τ 2.44 with
# 12 and 1.61x at τ 2.24 with 8 (2026-12-01), so only AMX CPUs get the larger tree (and those without get
# SMALL_CPU_TREE, below).
HALF_CPU_TREE = dict(depth=6, topk=4, tokens=16)
# An fp32 target on a CPU runs Inductor's C++ GEMM template (GEMM_TEMPLATE_OPTIONS in generate.py), whose fp32
# kernels cost about one plain step for up to 4 rows and jump at the fifth (AMD EPYC without AMX, 2026-12-02:
# 5 MT-bench prompts in one process, plain decoding 42.9 tok/s; EAGLE with 3 tokens 1.93x at τ 1.92, 4 tokens
# 1.84-1.90x at τ 2.01-2.08, 5 tokens 1.34x at τ 2.21; in another run 6 tokens 1.15x, 8 0.98x, 12 0.89x at τ 2.62).
# 4 tokens is root + 3, so depth 3 is the deepest path it can hold. Most of that jump was GCC leaving the
# template's 5-8-row micro-kernels out of line (generate.inline_gemm_micro_kernels): with them forced inline
# the same EPYC's compiled fp32 forward cost 25.4 ms at 4 tokens and 31.8 at 8 (52.6 before; one process,
# medians of 20), yet 4 tokens stayed the best tree (2026-12-02, 5 MT-bench prompts, one process, plain
# decoding 48.1 tok/s: 4 tokens 1.80x at τ 2.08, 6 tokens 1.72x at τ 2.29, 8 tokens 1.47x at τ 2.37). On the
# Xeons (earlier runs) fp32 16 tokens had fallen to 1.12x from 1.22x at 12; 4 tokens were not measured there.
# A bf16 target without AMX gets the same tree: its template kernels also compute in fp32 FMAs (19-20 ms a forward
# at 2-4 rows, 32-33 at 8-16, 12.3 at one), and with the verify's kernel timed at the tree's size
# (choose_half_verify) the same EPYC gave 1.15x at τ 1.93 with 4 tokens against 0.90x at τ 2.52 with 12 (6
# MT-bench prompts, one process, plain bf16 decoding 83.5 tok/s; 12 tokens with an untimed oneDNN verify had given
# 0.77x). Weight-only int8/int4 targets get it too, their kernels paying per row as well: int8 on that EPYC gave
# 0.93x at τ 2.19 with 4 tokens against 0.56x at τ 2.64 with 12 (5 prompts, one process, plain int8 decoding 115.5
# tok/s); still below plain decoding. With the micro-kernels inline, bf16 there gave 1.01x at τ 1.95 with 4 tokens
# and 0.87x at τ 2.29 with 6 (5 prompts, one process, plain bf16 decoding 92.2 tok/s): its 4-token round still
# cost ~2 plain steps. Since the template runs every matmul of a bf16 verify and keeps its accumulators in
# registers (generate.TEMPLATE_ONLY_OPTIONS, generate._MICRO_GEMM_HALF_LOAD) a 4-token bf16 round costs ~1.3-1.4
# plain steps there (2026-12-07: verify 13.3 ms, the draft's update 2.0 ms, plain step 12.0 ms on a slow
# moment), and with lookup nodes bf16 EAGLE was 1.53x plain decoding at τ 2.51 (20 MT-bench prompts,
# docs/perf-bf16). Rechecked in bf16 after the dot-product micro-kernel and the C++ attention (EPYC, 2026-12-07,
# 8 MT-bench prompts, one process, lookup nodes on): 4 tokens 1.59x at τ 2.52, 8 tokens 1.26-1.27x at τ
# 2.69-2.80 (depth 4 / 5), 12 tokens 1.05x, 16 tokens 1.00x at τ 3.10 (README, "EAGLE in bf16" (5)).
SMALL_CPU_TREE = dict(depth=3, topk=2, tokens=4)
LOOKUP_K, DRAFT_LM_K = 6, 4
# EAGLE trees at temperature 0 get this many prompt-lookup nodes (LookupBranchDrafter).
LOOKUP_BRANCH = 4
# On a CPU the draft head is a memory-bound matmul over the draft vocabulary, paid at every tree depth
# (~0.5 ms a depth for 12288 rows of 576 in bf16 here). With the previous SmolLM2 draft (12288 trained),
# keeping its 4096 most frequent tokens left τ unchanged (2.44 on 6 MT-bench prompts, bf16) and took bf16
# EAGLE from 0.85× to 1.03× plain decoding in the same process; 2048 lowered τ to 2.33. A draft whose
# vocabulary is already smaller is kept as is; --draft-vocab overrides this; CUDA keeps the trained size.
CPU_DRAFT_VOCAB = 4096
# A float draft on a CPU runs in int8 unless --draft-quant none: a draft round is a chain of one-row,
# memory-bound matmuls, and int8 halves their bytes. On 8 MT-bench prompts (compiled bf16 target, one
# process, interleaved, slow-memory day) it took EAGLE from 1.81x to 2.08x plain decoding (47.3 -> 42.2 ms a
# round) at the same τ (2.36 -> 2.41). Lossless either way: the draft only proposes.
CPU_DRAFT_QUANT = "int8"
# --tree-tokens auto times these budgets (1..64; every size in between would cost a minute on a CPU for
# a curve that is smooth anyway)
COST_GRID = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 56, 64)
SHIPPED_DRAFT = "eagle_draft.pth"   # --speculate without --draft looks for this next to the target's model.pth


def default_tree(tree: str, target, device) -> dict:
    """Depth, top-k and token budget for `tree` when the user gives none (see DEFAULTS, HALF_CPU_TREE,
    SMALL_CPU_TREE)."""
    from generate import linear_kind
    if tree not in ("dynamic", "static") or torch.device(device).type != "cpu":
        return DEFAULTS[tree]
    kind = linear_kind(target)
    return HALF_CPU_TREE if kind == "half" and cpu_has_amx() else SMALL_CPU_TREE


def default_lookup_branch(target, device) -> int:
    """LOOKUP_BRANCH where it was measured to pay, 0 elsewhere. It pays on CUDA, where a larger verify costs
    about what a smaller one does; for fp32 on a CPU (the A/B in LookupBranchDrafter's docstring); and for
    bf16/fp16 on a CPU without AMX (the 4-token tree), now that the C++ GEMM template runs every matmul of a
    half-precision verify and loads its weights without spilling its accumulators (generate.TEMPLATE_ONLY_OPTIONS,
    generate._MICRO_GEMM_HALF_LOAD): compiled bf16 on an AMD EPYC without AMX (2026-12-07, 8 MT-bench prompts
    after a warm-up one, 256 tokens, one process, interleaved with plain decoding at 107.6 tok/s): EAGLE 1.38x at
    τ 1.96 without the nodes, 1.49x at τ 2.40 with them (in 22% of the rounds). Before those two changes the
    8-row bf16 verify cost about twice the 4-row one, and the nodes lost there (2026-12-04: 1.22x at τ 2.15
    with, 1.30x at τ 1.94 without; docs/perf-bf16-lookup). Off for the AMX tree (16 tokens, not measured with
    them) and for int4 on aten's kernel (no AVX512-BF16: its template pays per row; not measured). An int4
    target on eaglet's own kernel (int4_cpu.cpp), whose 8-row matmuls cost far less than 8 one-row ones, gets them:
    compiled int4 (int4 draft) on the EPYC, 2026-12-07, 4 MT-bench prompts, 256 tokens, EAGLE against plain int4
    decoding in the same run, two runs: 0.97x at τ 2.11 without the nodes, 1.25x at τ 2.44 with them. Weight-only
    int8 gets them too: compiled int8 (int8 draft) on the EPYC, 2026-12-07, 6 MT-bench prompts after a warm-up
    one, 256 tokens, one process, interleaved with plain int8 decoding at 140-149 tok/s: 1.04x at τ 2.04 without
    them, 1.29x at τ 3.08 with them (in 34% of the rounds)."""
    from generate import linear_kind
    if torch.device(device).type == "cpu":
        kind = linear_kind(target)
        from quantize import WeightOnlyInt4Linear
        if (kind == "quant" and any(isinstance(m, WeightOnlyInt4Linear) and m.packed_for != "eaglet-cpu"
                                    for m in target.modules())
                or kind == "half" and cpu_has_amx()):
            return 0
    return LOOKUP_BRANCH


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, on which a bf16 matmul of up to 16 rows costs about what one row does
    (see HALF_CPU_TREE). The machines this was tuned on were Intel Xeons with AMX and AMD EPYCs without."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)   # private; absent in some torch builds
    return bool(probe()) if probe is not None else False


def shipped_draft(target):
    """The default EAGLE draft for `target`: `eagle_draft.pth` beside its checkpoint, else the one this
    repository ships in drafts/<checkpoint directory name>.eagle.pth (e.g. SmolLM2-135M-Instruct). The
    name only finds the file; load_draft still checks that the draft fits the target's shapes."""
    from pathlib import Path
    meta = getattr(target, "checkpoint_meta", None) or {}
    if not meta.get("path"):
        return None
    ckpt_dir = Path(meta["path"]).resolve().parent
    for p in (ckpt_dir / SHIPPED_DRAFT, Path(__file__).resolve().parent / "drafts" / f"{ckpt_dir.name}.eagle.pth"):
        if p.exists():
            return p
    return None


def measure_verify_cost(target, ns=range(1, 65), reps: int = 3, forward=target_tree_forward,
                        progress=None) -> dict:
    """Seconds for one target forward over n tree tokens on top of a half-full cache, for each n (the
    median of `reps`). Every n is called once first (with --compile, that compiles it; progress(n) is
    called after), then the reps go round all the n in turn: this machine's memory changes speed from one
    minute to the next, and timing the sizes one after the other had put n = 2 at 1.48x n = 1 and n = 3 at
    1.10x (bf16, compiled, EPYC, 2026-12-07). Uses the caches as they are (set them up first); leaves their
    content dirty."""
    dev = target.tok_embeddings.weight.device
    S = target.max_seq_length
    ns = list(ns)
    L = torch.tensor(max(0, min(S // 2, S - max(ns) - 1)), device=dev)
    trees = {n: chain_tree(torch.zeros(n, dtype=torch.long, device=dev), torch.ones(n, dtype=torch.bool, device=dev))
             for n in ns}

    def once(n):
        t = time.perf_counter()
        lg, _ = verify(target, trees[n], L, forward, int(L))
        float(lg[0, 0])
        return time.perf_counter() - t

    times = {n: [] for n in ns}
    # every n is its own graph: lift Dynamo's per-function recompile limit (8) for the sweep, or a
    # compiled `forward` (fullgraph=True) would fail hard at the ninth size (n ≤ 64, plus the budgets
    # compiled for decoding)
    with torch._dynamo.config.patch(recompile_limit=128):
        for n in ns:
            once(n)
            if progress is not None:
                progress(n)
        for _ in range(reps):
            for n in ns:
                times[n].append(once(n))
    return {n: sorted(v)[len(v) // 2] for n, v in times.items()}


def verify_cost_forward(target, device):
    """The compiled tree forward that --tree-tokens auto and --measure-verify time: compiled as decoding's
    verify is. A bf16/fp16 target on a CPU gets Inductor's C++ GEMM template, which choose_half_verify
    kept at every tree size it was given on this project's EPYC (4 to 20 rows, 2026-12-07); compile_step's
    own default for such a target is oneDNN, whose forward cost ~2x the template's at one token there
    (21.8 against ~11 ms), so the curve it gave was not the cost of any verify decoding runs."""
    from generate import compile_step, linear_kind
    half_cpu = torch.device(device).type == "cpu" and linear_kind(target) == "half"
    return compile_step(target_tree_forward, target, device, template=True if half_cpu else None)


def pick_tree_tokens(cost: dict, tau_gain: float = 0.9) -> int:
    """The budget n maximising expected tokens per second τ(n) / cost(n), with τ(n) = 1 + 0.9·ln n:
    EAGLE-2's acceptance grows roughly logarithmically with the tree size (τ ≈ 4.5 at n = 60 on GPU
    papers' chat models, 1 at n = 1). On a GPU cost(n) is flat, so this picks the largest n; on a CPU the
    measured curve pulls it down to where one more token costs more than the acceptance it buys."""
    import math
    return max(cost, key=lambda n: (1 + tau_gain * math.log(n)) / cost[n])


def build_drafter(method: str, target, *, draft_path=None, draft_checkpoint=None, tree: str = "dynamic",
                  tree_depth: Optional[int] = None, tree_topk: Optional[int] = None, tree_tokens=None,
                  draft_vocab: Optional[int] = None, draft_quant: Optional[str] = None, device=None, dtype=None,
                  compile: bool = False, lookup_branch: Optional[int] = None):
    """A drafter for speculative_generate. method: "eagle" (draft_path = EAGLE draft checkpoint), "draft"
    (draft_checkpoint = a small target-format LM, chain of tree_depth tokens) or "lookup" (prompt
    lookup, chain of tree_depth tokens). tree_tokens: int or "auto" (measure the target's verify cost).
    lookup_branch: tokens of the prompt-lookup branch added to EAGLE's greedy trees (0: none; default
    LOOKUP_BRANCH, see default_lookup_branch)."""
    from checkpoint import UserError, load_model
    from generate import compile_step
    device = device or target.tok_embeddings.weight.device
    dtype = dtype or target.tok_embeddings.weight.dtype
    # --tree-tokens auto times the target's tree forward alone (one graph per budget); decoding runs
    # verify_and_accept, which wraps that forward with acceptance and KV compaction in one graph
    verify_forward = verify_cost_forward(target, device) if compile and tree_tokens == "auto" \
        else target_tree_forward
    if method == "lookup":
        d = LookupDrafter(k=tree_depth or LOOKUP_K)
    elif method == "draft":
        if draft_checkpoint is None:
            raise UserError("--spec-method draft needs --draft-checkpoint (a small model of the same family)")
        dm = load_model(draft_checkpoint, device, dtype)
        if dm.args.vocab_size > target.args.vocab_size:
            raise UserError(f"draft model {draft_checkpoint} has a larger vocabulary ({dm.args.vocab_size}) than "
                            f"the target ({target.args.vocab_size}); use a model with the target's tokenizer")
        d = DraftModelDrafter(dm, k=tree_depth or DRAFT_LM_K, compile=compile)
    elif method == "eagle":
        import eagle_draft
        if draft_path is None:
            draft_path = shipped_draft(target)
        if draft_path is None:
            raise UserError("--spec-method eagle needs an EAGLE draft (--draft PATH; train one with "
                            "scripts/train_eagle.py or convert one with convert_hf_checkpoint.py --eagle)")
        # The draft only proposes, so its precision cannot change the output: beside an fp32 target it
        # runs in bf16 (half the bytes per draft step, and the CPU's bf16 matrix units).
        draft = eagle_draft.load_draft(draft_path, target, device,
                                       torch.bfloat16 if dtype == torch.float32 else dtype)
        if draft_vocab is None and torch.device(device).type == "cpu" and draft.d2t is not None:
            draft_vocab = CPU_DRAFT_VOCAB
        elif draft_vocab is not None:
            if draft.d2t is None:
                raise UserError(f"draft {draft_path} has no draft vocabulary to shrink; drop --draft-vocab "
                                f"or use a draft trained with one")
        if draft_vocab is not None and draft_vocab < draft.d2t.numel():
            # d2t is frequency-ranked: keep the most frequent
            draft.d2t = draft.d2t[:draft_vocab].clone()
            draft.bind_target(target)
        if draft_quant not in (None, "none", "int8"):
            raise UserError(f"--draft-quant must be none or int8, got {draft_quant!r}")
        if draft_quant is None and torch.device(device).type == "cpu" and not getattr(draft, "quantization", None):
            draft_quant = CPU_DRAFT_QUANT
        if draft_quant == "int8":
            import quantize
            if getattr(draft, "quantization", None):
                raise UserError(f"draft {draft_path} is already quantized ({draft.quantization['mode']}); "
                                f"drop --draft-quant")
            quantize.quantize_module(draft, "int8")
            draft.quantize_head_int8()
        if tree not in DEFAULTS:
            raise UserError(f"--tree must be dynamic, static or chain, got {tree!r}")
        dflt = default_tree(tree, target, device)
        depth, topk = tree_depth or dflt["depth"], tree_topk or dflt["topk"]
        tokens = tree_tokens if tree_tokens not in (None, "auto") else dflt["tokens"]
        if tree_tokens == "auto":
            if target.max_seq_length < 256:
                target.setup_caches(1, min(512, target.args.max_position_embeddings))
            cost = measure_verify_cost(target, COST_GRID, forward=verify_forward)
            tokens = pick_tree_tokens(cost)
        d = eagle_draft.EagleDrafter(draft, tree, depth, topk, int(tokens), compile=compile)
        if tree_tokens == "auto":
            d.verify_cost = cost
        if lookup_branch is None:
            lookup_branch = default_lookup_branch(target, device)
        if lookup_branch < 0:
            raise UserError(f"--lookup-branch must be >= 0 (0 = none), got {lookup_branch}")
        if lookup_branch:
            d = LookupBranchDrafter(d, k=lookup_branch)
    else:
        raise UserError(f"unknown speculative method {method!r} (eagle, draft, lookup)")
    if torch.device(device).type == "cpu":
        # int8 matmuls of several rows (the verify; the draft's catch-up and frontier) on eaglet's kernel,
        # from a packed copy of the codes that plain decoding does not hold (quantize.WeightOnlyInt8Linear)
        import quantize
        quantize.pack_int8_rows(target)
        if method == "eagle":
            quantize.pack_int8_rows(draft)
    if compile and isinstance(d, LookupBranchDrafter):
        d.small_step = compile_verify(target, d.eagle, device)
        # a half-precision target's larger verify takes the kernel its smaller one was timed to win with
        d.large_step = compile_step(verify_with_lookup, target, device,
                                    template=getattr(d.eagle, "verify_template", None))
    elif compile:
        d.verify_step = compile_verify(target, d, device)
    if compile:
        d.plain_forward = compile_step(_plain_step, target, device)
    return d


def compile_verify(target, drafter, device):
    """The drafter's compiled verify_and_accept. A half-precision target on a CPU gets the faster of its two
    matmul kernels at the drafter's tree size (choose_half_verify); others get compile_step's."""
    from generate import compile_step, linear_kind
    if torch.device(device).type == "cpu" and linear_kind(target) == "half":
        return choose_half_verify(target, drafter)
    return compile_step(verify_and_accept, target, device)


# Two names for the same verify, so that choose_half_verify's candidates are separate Dynamo cache entries.
def _verify_with_template(*args):
    return verify_and_accept(*args)


def _verify_with_library(*args):
    return verify_and_accept(*args)


def choose_half_verify(target, drafter, reps: int = 5):
    """Compile the verify of a bf16/fp16 CPU target with Inductor's C++ GEMM template and with oneDNN, time
    both on a greedy tree of the drafter's size, keep the faster. The kernel that wins one row (the decode
    step's choice, generate.choose_half_gemm) need not win N: on an AMD EPYC without AMX (2026-12-02) the
    template's bf16 forward cost 12.3 ms at 1 token, 19-20 at 2-4 and 32-33 at 8-16, oneDNN's 22.3 at 1 and
    41.0 at 12. Costs one extra compilation per target and tree size. Leaves the target's cache dirty (the
    next prefill overwrites it); sets up a small one if there is none."""
    from generate import CACHE_ROUNDING, compile_step, drop_compiled, time_candidates
    if target.max_seq_length <= 0:
        target.setup_caches(1, CACHE_ROUNDING)
    dev = target.tok_embeddings.weight.device
    N = drafter.N
    # the shape a greedy round's tree has (Dynamo specializes on max_depth and the children table's width)
    depth, width = (drafter.plan.depth, drafter.plan.K) if hasattr(drafter, "plan") else (N - 1, 1)
    ar = torch.arange(N, device=dev)
    tree = make_tree(torch.zeros(N, dtype=torch.long, device=dev), (ar - 1).clamp(min=0),
                     torch.ones(N, dtype=torch.bool, device=dev), depth, width)
    S = target.max_seq_length
    L = torch.tensor(max(0, min(S // 2, S - N - 1)), device=dev)
    cols = width_cols(M.visible_width(int(L) + N, S, dev), dev)
    steps = {True: compile_step(_verify_with_template, target, dev, template=True),
             False: compile_step(_verify_with_library, target, dev, template=False)}
    median = time_candidates(steps, lambda step: step(target, tree, L, cols, 0.0, None, None)[-1].tolist(), reps)
    template = median[True] < median[False]
    drop_compiled(_verify_with_library if template else _verify_with_template)
    drafter.verify_template = template
    return steps[template]


def main(argv=None):
    """python speculative.py --measure-verify CHECKPOINT [--compile] [--dtype bf16]: the target's verify
    cost for n = 1..64 tree tokens (what --tree-tokens auto measures), as a table."""
    import argparse
    import sys
    from checkpoint import load_model
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--measure-verify", required=True, help="target checkpoint (model.pth)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--max-n", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--coarse", action="store_true", help="n = 1, 2, 3, 4, 6, 8, 12, ... 64 only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    target = load_model(a.measure_verify, "cpu", dtype)
    target.setup_caches(1, 512)
    # compiled as generate.py --compile compiles it: time the graph decoding will run
    fwd = verify_cost_forward(target, "cpu") if a.compile else target_tree_forward
    ns = [n for n in (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 56, 64) if n <= a.max_n] if a.coarse \
        else range(1, a.max_n + 1)
    with torch.no_grad():
        cost = measure_verify_cost(target, ns, a.reps, fwd,
                                   progress=lambda n: print(f"n={n:3d} ready", file=sys.stderr, flush=True))
    for n in cost:
        print(f"n={n:3d}  {cost[n] * 1e3:8.2f} ms  x{cost[n] / cost[min(cost)]:.2f}")
    print(f"--tree-tokens auto would pick {pick_tree_tokens(cost)}")


if __name__ == "__main__":
    from checkpoint import run_cli
    run_cli(main)
