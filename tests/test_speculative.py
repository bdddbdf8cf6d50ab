"""Speculative decoding: lossless greedy (every drafter and tree shape), lossless sampling (statistical),
KV compaction, tree buffers, and no recompilation under torch.compile. CPU, fp32, tiny models."""
import copy
import math

import pytest
import torch

import cpu_kernels

import eagle_draft as E
import speculative as SP
from model import ModelArgs, Transformer
from tiny import slow_down_compiled, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # microscopic models: thread hand-offs cost more than the math, and on a busy 2-core box far more
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_target(seed=0, scale=8.0, **kw):
    torch.manual_seed(seed)
    t = Transformer(ModelArgs.from_hf_config(tiny_config(**kw))).eval()
    with torch.no_grad():   # peaked logits: greedy choices are far from ties (exact equality is meaningful)
        t.output.weight.mul_(scale)
    return t


@torch.no_grad()
def greedy_reference(t, prompt, n, stop=()):
    """Plain greedy decoding, one token per forward, written independently of speculative.py."""
    T = len(prompt)
    n = min(n, t.args.max_position_embeddings - T)
    t.setup_caches(1, min(T + n + 1, t.args.max_position_embeddings))
    out = [int(t(prompt[None], torch.arange(T))[0, -1].argmax())]
    while len(out) < n and out[-1] not in stop:
        pos = T + len(out) - 1
        out.append(int(t(torch.tensor([[out[-1]]]), torch.tensor([pos]))[0, -1].argmax()))
    return out


def train_draft(t, steps=120, seed=0, d2t=None):
    """An EAGLE draft fitted to the tiny target's own greedy continuations, so acceptance is high and
    deep tree paths are exercised."""
    torch.manual_seed(seed)
    B, P, G = 24, 8, 40
    prompts = torch.randint(0, t.args.vocab_size, (B, P))
    seqs = [greedy_reference(t, p, G) for p in prompts]
    x = torch.cat([prompts, torch.tensor(seqs)], 1)
    with torch.no_grad():
        t.setup_caches(B, x.shape[1])
        logits, feats = t(x, torch.arange(x.shape[1]), return_hidden=True)
    d = E.EagleDraft(t.args, draft_vocab=d2t).bind_target(t)
    opt = torch.optim.Adam([p for p in d.parameters()], lr=3e-3)
    target_next = logits[:, 1:].argmax(-1)      # what the target predicts after x_{t+1}
    if d2t is not None:
        t2d = torch.full((t.args.vocab_size,), -100)
        t2d[d2t] = torch.arange(d2t.numel())
        target_next = t2d[target_next]
    for _ in range(steps):
        h = d(feats[:, :-1], x[:, 1:])
        loss = torch.nn.functional.cross_entropy(d.logits(h).flatten(0, 1), target_next.flatten(),
                                                 ignore_index=-100)
        loss = loss + 5 * torch.nn.functional.smooth_l1_loss(h, feats[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return d.eval()


@pytest.fixture(scope="module")
def target():
    return make_target()


@pytest.fixture(scope="module")
def trained(target):
    return train_draft(target)


def _check(t, drafter, prompts, n, stop=(), min_tau=None):
    taus = []
    for p in prompts:
        ref = greedy_reference(t, p, n, stop)
        got, st = SP.speculative_generate(t, drafter, p, n, stop_ids=stop)
        assert got == ref, (drafter.method, getattr(drafter, "plan", None) and drafter.plan.kind)
        assert st["new_tokens"] == len(ref)
        assert sum(st["accept_hist"]) == st["rounds"]
        taus.append(st["mean_accepted"])
    if min_tau is not None:
        assert sum(taus) / len(taus) >= min_tau, taus
    return taus


def _prompts(seed, k=4, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g) for _ in range(k)]


@pytest.mark.parametrize("kind,depth,topk,tokens", [("chain", 4, 1, 5), ("static", 5, 4, 16),
                                                    ("dynamic", 4, 3, 10), ("dynamic", 6, 4, 24)])
def test_greedy_lossless_random_and_trained_drafts(target, trained, kind, depth, topk, tokens):
    random_draft = E.EagleDraft(target.args).eval().bind_target(target)
    for draft, min_tau in ((random_draft, None), (trained, 1.8)):
        dr = E.EagleDrafter(draft, kind, depth, topk, tokens)
        _check(target, dr, _prompts(1), 40, min_tau=min_tau)


def test_trained_draft_reaches_deep_paths(target, trained):
    dr = E.EagleDrafter(trained, "dynamic", 6, 4, 24)
    hist = [0] * 7
    for p in _prompts(2, 6):
        got, st = SP.speculative_generate(target, dr, p, 48)
        assert got == greedy_reference(target, p, 48)
        hist = [a + b for a, b in zip(hist, st["accept_hist"])]
    assert sum(hist[4:]) > 0, hist          # some rounds accepted 4+ draft tokens


def test_greedy_lossless_draft_vocab(target):
    d2t = torch.randperm(256, generator=torch.Generator().manual_seed(3))[:96]
    d = train_draft(target, steps=80, d2t=d2t)
    _check(target, E.EagleDrafter(d, "dynamic", 5, 4, 16), _prompts(4), 32)


def test_int8_draft_is_lossless_and_keeps_acceptance(target, trained, tmp_path):
    """--draft-quant int8 (the CPU default for a float draft): the draft's linears and its head rows in int8
    (half the bytes a draft step reads) only change proposals: the output is still the target's, and a trained draft still gets accepted."""
    d2t = torch.randperm(256, generator=torch.Generator().manual_seed(4))[:128]
    d = train_draft(target, steps=80, d2t=d2t)
    path = tmp_path / "d.pth"
    E.save_draft(d, path, target.args)
    fl = SP.build_drafter("eagle", target, draft_path=path, dtype=torch.float32, draft_quant="none")
    assert fl.draft.head_weight.is_floating_point() and not getattr(fl.draft, "quantization", None)
    float_tau = _check(target, fl, _prompts(12), 32)
    dr = SP.build_drafter("eagle", target, draft_path=path, dtype=torch.float32)   # the CPU default
    assert dr.draft.head_weight.dtype == torch.int8 and dr.draft.quantization["mode"] == "int8"
    int8_tau = _check(target, dr, _prompts(12), 32)
    assert sum(int8_tau) > 0.8 * sum(float_tau), (int8_tau, float_tau)


def test_int4_target_greedy_lossless(target, trained):
    """An int4 target (on eaglet's int4 kernel where the CPU has AVX512-BF16) verifying a tree with lookup nodes
    in fp32: the verify's rows must reproduce the one-row decode bit for bit, so the output is plain greedy's."""
    import quantize
    t = quantize.quantize_module(copy.deepcopy(target), "int4", 32)
    assert any(getattr(m, "packed_for", None) == "eaglet-cpu" for m in t.modules()) == cpu_kernels.int4_available()
    prompts = _prompts(21, 3) + _repetitive_prompts(22, 2)     # the draft (bound to the float target) only proposes
    _check(t, E.EagleDrafter(trained, "dynamic", 4, 3, 10), prompts, 32)
    _check(t, SP.LookupBranchDrafter(E.EagleDrafter(trained, "dynamic", 3, 2, 4), k=4), prompts, 32)


def test_quantized_target_gives_the_draft_its_head_rows(target):
    """With an int8 target the draft scores its vocabulary with the quantized head's own rows (materialised
    once), not by running the whole quantized head at every draft step."""
    import quantize
    t = quantize.quantize_module(copy.deepcopy(target), "int8")
    d2t = torch.arange(0, 256, 3)
    d = E.EagleDraft(t.args, draft_vocab=d2t).bind_target(t)
    h = torch.randn(5, t.args.dim)
    assert d.head_weight.shape == (d2t.numel(), t.args.dim)
    torch.testing.assert_close(d.logits(h), t.output(h)[:, d2t], rtol=1e-4, atol=1e-4)


def test_greedy_lossless_draft_model_and_lookup(target):
    other = make_target(seed=5)
    _check(target, SP.DraftModelDrafter(other, k=3), _prompts(5), 30)
    # the target drafting for itself accepts every token: τ = k + 1 (up to the final truncated round)
    _check(target, SP.DraftModelDrafter(copy.deepcopy(target), k=3), _prompts(6, 2), 33, min_tau=3.9)
    _check(target, SP.LookupDrafter(k=5), _prompts(7), 40)


def _scan_lookup(ctx, k, max_n=3, min_n=1):
    """Prompt lookup by a plain backward scan (what NgramIndex must agree with)."""
    for n in range(min(max_n, len(ctx) - 1), min_n - 1, -1):
        for start in range(len(ctx) - n - 1, -1, -1):
            if ctx[start:start + n] == ctx[-n:]:
                return ctx[start + n:start + n + k]
    return []


@pytest.mark.parametrize("min_n", [1, 2, 3])
def test_ngram_index_finds_what_a_scan_finds(min_n):
    g = torch.Generator().manual_seed(min_n)
    for _ in range(30):
        toks = torch.randint(0, 5, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
        idx = SP.NgramIndex(3, min_n)
        idx.reset(toks[:1])
        i = 1
        while i < len(toks):        # grow by rounds of 1-4 tokens, as accepted tokens arrive
            j = min(len(toks), i + int(torch.randint(1, 5, (1,), generator=g)))
            idx.extend(toks[i:j])
            i = j
            assert idx.match(6) == _scan_lookup(toks[:i], 6, 3, min_n), toks[:i]


def test_graft_lookup_follows_the_tree_then_hangs_the_rest_below():
    # root(10) → 11 → 13, root → 12; max_depth 2
    tree = SP.make_tree(torch.tensor([10, 11, 12, 13]), torch.tensor([0, 0, 0, 1]), torch.ones(4, dtype=torch.bool), 2, 2)
    for prop, n_prop, parent0, toks, valid in [
        ([11, 13, 20, 21, 22], 5, 3, [20, 21, 22], [1, 1, 1]),   # the tree has 11, 13: hang 20.. below 13
        ([12, 30, 31, 0, 0], 3, 2, [30, 31, 0], [1, 1, 0]),     # only 12: below 12; two valid tokens left
        ([40, 41, 42, 0, 0], 3, 0, [40, 41, 42], [1, 1, 1]),    # none: below the root
        ([11, 13, 0, 0, 0], 2, 3, [0, 0, 0], [0, 0, 0]),        # all in the tree already: nothing to add
    ]:
        g = SP.graft_lookup(tree, torch.tensor(prop), torch.tensor(n_prop), 3, 5)
        assert g.tokens[4:].tolist() == toks and g.valid[4:].int().tolist() == valid
        nv = sum(valid)      # valid grafted nodes form a chain below parent0 (invalid ones are isolated)
        assert g.parent[4:4 + nv].tolist() == [parent0, 4, 5][:nv]
        deepest = int(g.depth[torch.where(g.valid)[0]].max())
        assert deepest == max(int(tree.depth[parent0]) + sum(valid), 2)


def _repetitive_prompts(seed, k=4):
    """Prompts that repeat a phrase: where the lookup branch has something to offer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        phrase = torch.randint(0, 256, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g)
        out.append(torch.cat([phrase] * int(torch.randint(2, 5, (1,), generator=g))))
    return out


@pytest.mark.parametrize("kind,depth,topk,tokens,k", [("dynamic", 3, 2, 4, 6), ("chain", 4, 1, 5, 3),
                                                      ("dynamic", 6, 4, 24, 4), ("static", 5, 4, 16, 8)])
def test_lookup_branch_is_lossless_and_adds_accepted_tokens(target, trained, kind, depth, topk, tokens, k):
    prompts = _prompts(12, 3) + _repetitive_prompts(13)
    random_draft = E.EagleDraft(target.args).eval().bind_target(target)
    for draft in (random_draft, trained):
        plain = _check(target, E.EagleDrafter(draft, kind, depth, topk, tokens), prompts, 40)
        dr = SP.LookupBranchDrafter(E.EagleDrafter(draft, kind, depth, topk, tokens), k=k)
        branched = _check(target, dr, prompts, 40)
        assert dr.branch_rounds > 0
        # the branch only adds candidates, so a round accepts at least what EAGLE's tree alone would
        # (up to the draft's float noise changing later trees): over these prompts τ must not fall
        assert sum(branched) > sum(plain), (plain, branched)


def test_lookup_branch_stops_and_cache_end(target, trained):
    for p in _repetitive_prompts(14, 3):
        ref = greedy_reference(target, p, 40)
        stop = (ref[len(ref) // 2],)
        dr = SP.LookupBranchDrafter(E.EagleDrafter(trained, "dynamic", 3, 2, 4), k=6)
        got, _ = SP.speculative_generate(target, dr, p, 40, stop_ids=stop)
        assert got == greedy_reference(target, p, 40, stop) and got[-1] == stop[0]
        for n in (1, 2, 5, 7):
            assert SP.speculative_generate(target, dr, p, n)[0] == ref[:n]
    small = make_target(max_position_embeddings=64)
    d = E.EagleDraft(small.args).eval().bind_target(small)
    for p in _repetitive_prompts(15, 3):
        got, st = SP.speculative_generate(small, SP.LookupBranchDrafter(E.EagleDrafter(d, "dynamic", 3, 2, 4)), p, 100)
        assert got == greedy_reference(small, p, 100) and len(got) == 64 - len(p)


def test_lookup_branch_leaves_sampling_trees_alone(target, trained):
    dr = SP.LookupBranchDrafter(E.EagleDrafter(trained, "dynamic", 3, 2, 4), k=6)
    p = _repetitive_prompts(16, 1)[0]
    torch.manual_seed(0)
    got, st = SP.speculative_generate(target, dr, p, 30, temperature=1.0)
    assert len(got) == 30 and dr.branch_rounds == 0 and st["rounds"] > 0


def test_compiled_lookup_branch_compiles_both_verify_sizes_once(target, trained):
    """Both verify graphs compile on the first greedy round (whichever size it has); later generations,
    with and without the branch, add no graphs and stay lossless."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    t = copy.deepcopy(target)
    d = copy.deepcopy(trained).bind_target(t)
    prompts = _repetitive_prompts(17, 3) + _prompts(18, 2)
    refs = [greedy_reference(target, p, 24) for p in prompts]
    dr = SP.LookupBranchDrafter(E.EagleDrafter(d, "dynamic", 3, 2, 4, compile=True), k=5)
    dr.small_step = torch.compile(SP.verify_and_accept, fullgraph=True, dynamic=False)
    dr.large_step = torch.compile(SP.verify_with_lookup, fullgraph=True, dynamic=False)
    t.setup_caches(1, 128)
    SP.speculative_generate(t, dr, torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(3)), 8)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 3
    for p, ref in zip(prompts, refs):
        assert SP.speculative_generate(t, dr, p, 24)[0] == ref
        assert dr.branch_rounds > 0 or p.shape[0] < 12
    assert counters["stats"]["unique_graphs"] == graphs


def test_build_drafter_lookup_branch_defaults(target, tmp_path):
    draft = E.EagleDraft(target.args).eval().bind_target(target)
    path = tmp_path / "d.pth"
    E.save_draft(draft, path, target.args)
    dr = SP.build_drafter("eagle", target, draft_path=path, tree_depth=3, tree_topk=2, tree_tokens=4)
    assert isinstance(dr, SP.LookupBranchDrafter) and dr.k == SP.LOOKUP_BRANCH       # fp32 target
    assert isinstance(SP.build_drafter("eagle", target, draft_path=path, lookup_branch=0), E.EagleDrafter)
    half = copy.deepcopy(target).to(torch.bfloat16)
    # bf16 on a CPU: with lookup nodes on the 4-token tree (no AMX), without on the AMX one
    import unittest.mock
    for amx, kind in ((False, SP.LookupBranchDrafter), (True, E.EagleDrafter)):
        with unittest.mock.patch.object(SP, "cpu_has_amx", lambda amx=amx: amx):
            assert type(SP.build_drafter("eagle", half, draft_path=path, device="cpu")) is kind
    import quantize
    from generate import linear_kind
    q8 = copy.deepcopy(half)
    quantize.quantize_module(q8, "int8")
    assert linear_kind(q8) == "quant"
    # int8 gets them (its 8-row verify measured cheap enough); lookup_branch=0 still turns them off
    assert type(SP.build_drafter("eagle", q8, draft_path=path, device="cpu")) is SP.LookupBranchDrafter
    assert isinstance(SP.build_drafter("eagle", q8, draft_path=path, device="cpu", lookup_branch=0), E.EagleDrafter)
    # int4 gets them where it runs eaglet's kernel (cheap 8-row matmuls), not on aten's
    q4 = quantize.quantize_module(copy.deepcopy(half), "int4", 32)
    on_kernel = any(getattr(m, "packed_for", None) == "eaglet-cpu" for m in q4.modules())
    assert on_kernel == cpu_kernels.int4_available()
    assert type(SP.build_drafter("eagle", q4, draft_path=path, device="cpu")) is (
        SP.LookupBranchDrafter if on_kernel else E.EagleDrafter)
    with unittest.mock.patch.object(cpu_kernels, "int4_available", lambda: False):
        q4a = quantize.quantize_module(copy.deepcopy(half), "int4", 32)
    assert {m.packed_for for m in q4a.modules() if hasattr(m, "packed_for")} == {"cpu"}
    assert type(SP.build_drafter("eagle", q4a, draft_path=path, device="cpu")) is E.EagleDrafter


def test_stops_eos_max_tokens_and_cache_end(target, trained):
    # EOS mid-round: pick a token the greedy continuation really produces and use it as the stop id
    for p in _prompts(8, 3):
        ref = greedy_reference(target, p, 40)
        stop = (ref[len(ref) // 2],)
        for dr in (E.EagleDrafter(trained, "dynamic", 5, 4, 16), SP.LookupDrafter(4)):
            got, _ = SP.speculative_generate(target, dr, p, 40, stop_ids=stop)
            assert got == greedy_reference(target, p, 40, stop) and got[-1] == stop[0]
    # max_new_tokens at every offset within a round
    dr = E.EagleDrafter(trained, "chain", 4, 1, 5)
    p = _prompts(9, 1)[0]
    full = greedy_reference(target, p, 30)
    for n in range(1, 12):
        assert SP.speculative_generate(target, dr, p, n)[0] == full[:n]
    # the cache end (max_position_embeddings 64) reached mid-round: shrink to plain steps, stop at the end
    small = make_target(max_position_embeddings=64)
    d = E.EagleDraft(small.args).eval().bind_target(small)
    for T in (20, 37, 55):
        p = torch.randint(0, 256, (T,))
        got, st = SP.speculative_generate(small, E.EagleDrafter(d, "dynamic", 5, 4, 16), p, 100)
        assert got == greedy_reference(small, p, 100) and len(got) == 64 - T


def test_kv_compaction_matches_plain_decoding(target, trained):
    """After rounds, target and draft caches hold what plain decoding of the accepted tokens gives."""
    p = _prompts(10, 1)[0]
    dr = E.EagleDrafter(trained, "dynamic", 5, 4, 16)
    got, st = SP.speculative_generate(target, dr, p, 25)
    assert st["mean_accepted"] > 1.5
    T = len(p)
    n = T + len(got) - 1                         # tokens in the cache (the last one was never fed)
    k_spec = [l.attention.kv_cache.k_cache[..., :n, :].clone() for l in target.layers]
    v_spec = [l.attention.kv_cache.v_cache[..., :n, :].clone() for l in target.layers]
    d_k = trained.layer.attention.kv_cache.k_cache[..., :n - 1, :].clone()
    seq = torch.cat([p, torch.tensor(got)])
    ref = copy.deepcopy(target)
    ref.setup_caches(1, 128)
    with torch.no_grad():
        feats = ref.hidden(seq[None, :n], torch.arange(n))
    for l, k, v in zip(ref.layers, k_spec, v_spec):
        torch.testing.assert_close(l.attention.kv_cache.k_cache[..., :n, :], k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l.attention.kv_cache.v_cache[..., :n, :], v, atol=1e-5, rtol=1e-5)
    rd = copy.deepcopy(trained).bind_target(ref)
    rd.setup_caches(128)
    with torch.no_grad():
        rd(feats[:, :n - 1], seq[None, 1:n], torch.arange(n - 1))
    torch.testing.assert_close(rd.layer.attention.kv_cache.k_cache[..., :n - 1, :], d_k, atol=1e-5, rtol=1e-5)


def test_tree_buffers():
    # root → a, b ; a → c ; c → d ; padding node
    tok = torch.tensor([5, 6, 7, 8, 9, 0])
    parent = torch.tensor([0, 0, 0, 1, 3, 0])
    valid = torch.tensor([True, True, True, True, True, False])
    tr = SP.make_tree(tok, parent, valid, 3, 2)
    assert tr.depth.tolist() == [0, 1, 1, 2, 3, 0]
    assert tr.mask[4].tolist() == [True, True, False, True, True, False]
    assert tr.mask[5].tolist() == [False] * 5 + [True]          # padding attends to itself only
    assert tr.paths[4].tolist() == [0, 1, 3, 4]
    assert tr.children[0].tolist() == [1, 2] and tr.children[1].tolist() == [3, -1]
    # greedy acceptance: target argmax after root = 6, after node 1 = 8, after node 3 = 1 (≠ 9)
    logits = torch.full((6, 10), -1.0)
    for i, nxt in enumerate([6, 8, 0, 1, 0, 0]):
        logits[i, nxt] = 1.0
    path, n, bonus = SP.accept_greedy(tr, logits)
    assert int(n) == 3 and path[:3].tolist() == [0, 1, 3] and int(bonus) == 1


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_plans_are_ancestor_closed(target, kind):
    d = E.EagleDraft(target.args).eval().bind_target(target)
    d.setup_caches(64)
    dr = E.EagleDrafter(d, kind, 5, 4, 20)
    dr.h_root = torch.randn(64)
    for temp in (0.0, 1.0):
        tr = dr.propose(torch.tensor(3), torch.tensor(10), temp)
        assert (tr.parent < torch.arange(tr.parent.numel())).tolist()[1:] == [True] * (tr.parent.numel() - 1)
        assert int(tr.depth.max()) <= 5 and tr.tokens.numel() == dr.N
        if temp > 0:    # every node with children has the distribution they were drawn from
            has_kids = (tr.children >= 0).any(1)
            assert (tr.qrow[has_kids] >= 0).all()
            # sampling grows the static shape (a dynamic one may not depend on the draws): deep paths too
            assert sorted(tr.depth.tolist()) == sorted([0] + [len(q) for q in E.STATIC_TREE[:19]])


# ---- sampling: the output distribution is the target's -------------------------------------------

V_SMALL, M = 16, 4


def exact_joint(t, prompt, temperature, top_k, top_p):
    """P(x1..xM | prompt) under plain sampling from logits_to_probs, by enumerating all V^(M-1) prefixes."""
    T = len(prompt)
    joint = torch.ones(1)
    for m in range(M):
        pre = torch.cartesian_prod(*[torch.arange(V_SMALL)] * m).view(-1, m) if m else torch.zeros(1, 0).long()
        t.setup_caches(pre.shape[0], T + M)
        seq = torch.cat([prompt.expand(pre.shape[0], T), pre], 1)
        with torch.no_grad():
            lg = t(seq, torch.arange(seq.shape[1]))[:, -1]
        p = SP.logits_to_probs(lg, temperature, top_k, top_p)
        joint = (joint[:, None] * p).flatten()
    return joint.view(*[V_SMALL] * M)


def _gumbel_topk(logq, k):
    return torch.topk(logq - torch.empty_like(logq).exponential_().log(), k, dim=-1).indices


def _tree_round_samples(n, top_k, top_p, draw=True, seed=0):
    """n independent rounds of tree rejection sampling, batched, on a synthetic target and draft.

    Tree: root → c0, c1, c2 (drawn without replacement from q_root); c0 → 2 children, c1 → 1 child (drawn
    from q at that node, a function of its token). Target distributions come from logits tables indexed
    by the path. Each round's output is completed to 3 tokens from the exact target conditionals (what
    the next rounds would do), so the result must be distributed exactly as plain sampling."""
    g = torch.Generator().manual_seed(seed)
    V = V_SMALL
    lg0, lg1, lg2 = (torch.randn(*s, generator=g) * 2 for s in [(V,), (V, V), (V, V, V)])
    lq0, lq1 = torch.randn(V, generator=g) * 2, torch.randn(V, V, generator=g) * 2
    torch.manual_seed(seed + 1)
    logq0 = lq0.log_softmax(-1).expand(n, V)
    pick = _gumbel_topk if draw else (lambda lq, k: torch.topk(lq, k, dim=-1).indices)
    c = pick(logq0, 3)                                          # [n, 3] in draw order
    g0 = pick(lq1[c[:, 0]].log_softmax(-1), 2)
    g1 = pick(lq1[c[:, 1]].log_softmax(-1), 1)
    tokens = torch.cat([torch.zeros(n, 1).long(), c, g0, g1], 1)           # nodes 0 | 1 2 3 | 4 5 | 6
    parent = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    tree = SP.make_tree(tokens[0], parent, torch.ones(7, dtype=torch.bool), 2, 3)
    tree.tokens = tokens
    tree.q = torch.stack([lq0.softmax(-1).expand(n, V), lq1[c[:, 0]].softmax(-1), lq1[c[:, 1]].softmax(-1)], 1)
    tree.qrow = torch.tensor([0, 1, 2, -1, -1, -1, -1])
    logits = torch.stack([lg0.expand(n, V), lg1[c[:, 0]], lg1[c[:, 1]], lg1[c[:, 2]],
                          lg2[c[:, 0], g0[:, 0]], lg2[c[:, 0], g0[:, 1]], lg2[c[:, 1], g1[:, 0]]], 1)
    path, n_acc, bonus = SP.accept_sample(tree, logits, 1.0, top_k, top_p)
    acc_tok = tokens.gather(1, path)                            # [n, 3]: root, then accepted nodes
    out = torch.zeros(n, 3).long()
    for j in range(3):                                          # accepted tokens, then the bonus
        out[:, j] = torch.where(n_acc - 1 > j, acc_tok[:, (j + 1) % 3], bonus)
    probs = lambda lg: SP.logits_to_probs(lg, 1.0, top_k, top_p)   # noqa: E731
    # complete to 3 tokens from the exact target (the rounds after this one)
    y2 = SP.sample_from(probs(lg1[out[:, 0]]))
    out[:, 1] = torch.where(n_acc >= 2, out[:, 1], y2)
    y3 = SP.sample_from(probs(lg2[out[:, 0], out[:, 1]]))
    out[:, 2] = torch.where(n_acc >= 3, out[:, 2], y3)
    exact = probs(lg0)[:, None, None] * probs(lg1)[:, :, None] * probs(lg2)
    return out, exact, n_acc


def _distribution_tests(out, exact, dims_list):
    from scipy.stats import chi2
    n = out.shape[0]
    M_ = out.shape[1]
    counts = torch.zeros(*[V_SMALL] * M_)
    counts.index_put_(tuple(out.t()), torch.ones(n), accumulate=True)
    emp = counts / n
    worst = (0.0, 1.0)
    for dims in dims_list:
        others = tuple(i for i in range(M_) if i not in dims)
        pe, pt = (emp.sum(others) if others else emp).flatten(), (exact.sum(others) if others else exact).flatten()
        # total variation relative to what sampling noise alone gives (E|p̂-p| ≈ sqrt(2p(1-p)/(πn)))
        tv = 0.5 * (pe - pt).abs().sum().item()
        noise = 0.5 * (2 * pt * (1 - pt) / (math.pi * n)).sqrt().sum().item()
        tv = tv / max(noise, 1e-12)
        big = pt * n >= 5               # chi-square on cells with enough expected counts, the rest pooled
        obs = torch.cat([pe[big] * n, (pe[~big].sum() * n).view(1)])
        exp = torch.cat([pt[big] * n, (pt[~big].sum() * n).view(1)])
        keep = exp > 0
        stat = (((obs - exp) ** 2) / exp)[keep].sum().item()
        pval = chi2.sf(stat, int(keep.sum()) - 1)
        worst = (max(worst[0], tv), min(worst[1], pval))
    return worst


@pytest.mark.parametrize("top_k,top_p", [(None, None), (6, None), (None, 0.8), (6, 0.8)])
def test_tree_rejection_sampling_is_lossless(top_k, top_p):
    out, exact, n_acc = _tree_round_samples(100_000, top_k, top_p)
    assert (n_acc >= 2).float().mean() > 0.2 and (n_acc == 3).any()     # the tree is really used
    tv, pval = _distribution_tests(out, exact, [(0,), (1,), (2,), (0, 1), (1, 2), (0, 1, 2)])
    assert tv < 1.5 and pval > 1e-4, (tv, pval)    # tv: in units of the expected sampling noise


def test_tree_rejection_sampling_test_has_power():
    # deterministic top-k children with min(1, p/q) acceptance is biased: the same test must catch it
    out, exact, _ = _tree_round_samples(100_000, None, None, draw=False)
    _, pval = _distribution_tests(out, exact, [(0,), (1,), (2,), (0, 1), (1, 2), (0, 1, 2)])
    assert pval < 1e-6


def test_sampling_lossless_end_to_end(top_k=5, top_p=0.9):
    """The real EAGLE drafter + speculative_generate on a microscopic target (fewer samples: each is a
    full generation), against the exact distribution of the first M tokens."""
    cfg = dict(vocab_size=V_SMALL, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    t = make_target(seed=1, scale=4.0, **cfg)
    prompt = torch.tensor([3, 7, 1])
    exact = exact_joint(t, prompt, 1.0, top_k, top_p)
    draft = E.EagleDraft(t.args).eval().bind_target(t)
    dr = E.EagleDrafter(draft, "dynamic", 3, 3, 8)
    n = 800
    torch.manual_seed(1)
    outs, taus = [], []
    for _ in range(n):
        out, st = SP.speculative_generate(t, dr, prompt, M, temperature=1.0, top_k=top_k, top_p=top_p)
        outs.append(out)
        taus.append(st["mean_accepted"])
    assert sum(taus) / n > 1.2          # speculation really happened (accepted draft tokens)
    tv, pval = _distribution_tests(torch.tensor(outs), exact, [(1,), (2,), (3,)])
    assert tv < 1.5 and pval > 1e-4, (tv, pval)


def test_compiled_generation_does_not_recompile(target, trained):
    """compile=True: the verify step (forward + acceptance + KV compaction) and the draft's round (catch-up
    + next proposal) each compile once per sampling setting; further generations (other prompts, lengths, sampling, attention widths up to the whole cache) add
    no graphs and stay lossless."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    t = copy.deepcopy(target)
    d = copy.deepcopy(trained).bind_target(t)
    # the 60- and 90-token prompts widen the attended slots past 64 and up to the whole 128-slot cache
    prompts = _prompts(11, 3) + [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n))
                                 for n in (60, 90)]
    refs = [greedy_reference(target, p, 24) for p in prompts]
    dr = E.EagleDrafter(d, "dynamic", 4, 3, 10, compile=True)
    dr.verify_step = torch.compile(SP.verify_and_accept, fullgraph=True, dynamic=False)
    t.setup_caches(1, 128)
    SP.speculative_generate(t, dr, torch.randint(0, 256, (5,)), 16)        # warm-up, greedy
    # sampling is part of both graphs (acceptance, the draft's draws): one more entry each per setting
    SP.speculative_generate(t, dr, torch.randint(0, 256, (5,)), 16, temperature=1.0, top_k=20)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 4
    for p, ref in zip(prompts, refs):
        assert SP.speculative_generate(t, dr, p, 24)[0] == ref
    SP.speculative_generate(t, dr, prompts[0], 24, temperature=1.0, top_k=20)
    assert counters["stats"]["unique_graphs"] == graphs


def test_shipped_draft_lookup(tmp_path):
    """--speculate without --draft: eagle_draft.pth beside the checkpoint wins, else drafts/<dir>.eagle.pth."""
    from pathlib import Path
    from speculative import shipped_draft

    class T:
        pass
    t = T()
    t.checkpoint_meta = {"path": str(tmp_path / "Nobody-1B" / "model.pth")}
    (tmp_path / "Nobody-1B").mkdir()
    assert shipped_draft(t) is None
    (tmp_path / "Nobody-1B" / "eagle_draft.pth").write_bytes(b"x")
    assert shipped_draft(t) == (tmp_path / "Nobody-1B" / "eagle_draft.pth").resolve()
    t.checkpoint_meta = {"path": str(tmp_path / "SmolLM2-135M-Instruct" / "model_int4.g32.pth")}
    repo = Path(__file__).resolve().parent.parent
    assert shipped_draft(t) == repo / "drafts" / "SmolLM2-135M-Instruct.eagle.pth"


def test_measure_verify_cost_compiled_past_recompile_limit(target):
    """--tree-tokens auto / --measure-verify with --compile time one graph per budget: more budgets than
    Dynamo's recompile limit (8; lowered to 1 here to keep the test short) must not turn into a hard
    failure under fullgraph=True."""
    torch._dynamo.reset()
    t = copy.deepcopy(target)
    t.setup_caches(1, 64)
    fwd = torch.compile(SP.target_tree_forward, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        cost = SP.measure_verify_cost(t, (1, 2), reps=1, forward=fwd)
    assert sorted(cost) == [1, 2] and all(c > 0 for c in cost.values())


def test_measure_verify_cost_interleaves_sizes(target, monkeypatch):
    """The verify-cost curve warms every size first, then times the sizes in turn (the machine's memory
    changes speed minute to minute: sizes timed one after another compare different minutes), and it
    times a half-precision CPU target with the GEMM template that choose_half_verify keeps, not
    compile_step's oneDNN default."""
    t = copy.deepcopy(target)
    t.setup_caches(1, 64)
    calls, ready = [], []

    def fwd(tg, tokens, *rest):
        calls.append(tokens.shape[0])
        return SP.target_tree_forward(tg, tokens, *rest)

    cost = SP.measure_verify_cost(t, (1, 3), reps=2, forward=fwd, progress=lambda n: ready.append((n, len(calls))))
    assert calls == [1, 3, 1, 3, 1, 3] and ready == [(1, 1), (3, 2)] and sorted(cost) == [1, 3]
    import generate as G
    seen = []
    monkeypatch.setattr(G, "compile_step", lambda fn, model, device, template=None: seen.append(template))
    SP.verify_cost_forward(t, "cpu")
    SP.verify_cost_forward(copy.deepcopy(target).to(torch.bfloat16), "cpu")
    assert seen == [None, True]


def test_cpu_default_draft_vocab(target, tmp_path, monkeypatch):
    """On CPU an EAGLE draft's vocabulary is cut to its CPU_DRAFT_VOCAB most frequent tokens unless
    --draft-vocab says otherwise; a smaller one is kept whole."""
    d2t = torch.randperm(target.args.vocab_size, generator=torch.Generator().manual_seed(1))[:64]
    path = tmp_path / "d.pth"
    E.save_draft(E.EagleDraft(target.args, draft_vocab=d2t), path, target.args)
    monkeypatch.setattr(SP, "CPU_DRAFT_VOCAB", 32)
    d = SP.build_drafter("eagle", target, draft_path=path)
    assert torch.equal(d.draft.d2t, d2t[:32]) and d.draft.head_weight.shape[0] == 32
    assert SP.build_drafter("eagle", target, draft_path=path, draft_vocab=48).draft.d2t.numel() == 48
    monkeypatch.setattr(SP, "CPU_DRAFT_VOCAB", 100)
    assert torch.equal(SP.build_drafter("eagle", target, draft_path=path).draft.d2t, d2t)


def test_default_tree_follows_the_verify_cost_of_the_precision(target, monkeypatch):
    """On a CPU with AMX a bf16 target verifies 16 rows for the price of 12 (AMX tiles), so its default tree
    is larger; without AMX, and for fp32 targets on a CPU, the GEMM kernels pay per row (a jump after 4) and
    the 4-token tree is the default, as for weight-only quantized targets; CUDA keeps DEFAULTS."""
    import quantize
    half = copy.deepcopy(target).to(torch.bfloat16)
    monkeypatch.setattr(SP, "cpu_has_amx", lambda: False)
    assert SP.default_tree("dynamic", half, "cpu") == SP.SMALL_CPU_TREE
    assert SP.default_tree("chain", half, "cpu") == SP.DEFAULTS["chain"]
    monkeypatch.setattr(SP, "cpu_has_amx", lambda: True)
    assert SP.default_tree("dynamic", target, "cpu") == SP.SMALL_CPU_TREE                # fp32
    assert SP.default_tree("static", target, "cpu") == SP.SMALL_CPU_TREE
    assert SP.default_tree("chain", target, "cpu") == SP.DEFAULTS["chain"]
    assert SP.default_tree("dynamic", target, "cuda") == SP.DEFAULTS["dynamic"]
    assert SP.default_tree("dynamic", half, "cpu") == SP.HALF_CPU_TREE
    assert SP.default_tree("static", half, "cpu") == SP.HALF_CPU_TREE
    assert SP.default_tree("chain", half, "cpu") == SP.DEFAULTS["chain"]
    assert SP.default_tree("dynamic", half, "cuda") == SP.DEFAULTS["dynamic"]
    q = quantize.quantize_module(copy.deepcopy(half), "int8")
    assert SP.default_tree("dynamic", q, "cpu") == SP.SMALL_CPU_TREE
    assert SP.default_tree("dynamic", q, "cuda") == SP.DEFAULTS["dynamic"]
    d = E.EagleDraft(half.args).bind_target(half)
    dr = E.EagleDrafter(d, "dynamic", **SP.HALF_CPU_TREE)
    assert dr.N == SP.HALF_CPU_TREE["tokens"]
    for kind in ("dynamic", "static"):     # root + 3: a static tree of top-2 children trims to depth 2
        small = E.EagleDrafter(E.EagleDraft(target.args).bind_target(target), kind, **SP.SMALL_CPU_TREE)
        assert small.N == SP.SMALL_CPU_TREE["tokens"] and small.max_depth <= SP.SMALL_CPU_TREE["depth"]


@pytest.mark.parametrize("slow", ["library", "template"])
def test_half_precision_verify_times_both_kernels_and_keeps_the_faster(target, trained, monkeypatch, slow):
    """A bf16 CPU target's compiled verify is chosen by timing the GEMM template against oneDNN on a tree of
    the drafter's shape (here rigged: one candidate's calls are made slow); the kept graph is the one real
    rounds run (no recompilation) and they stay lossless against the same target decoding plainly."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    half = copy.deepcopy(target).to(torch.bfloat16)
    half.setup_caches(1, 128)
    prompt = _prompts(3, 1)[0]
    ref = greedy_reference(half, prompt, 16)
    dr = E.EagleDrafter(copy.deepcopy(trained).to(torch.bfloat16).bind_target(half), "dynamic",
                        **SP.SMALL_CPU_TREE, compile=True)
    slow_down_compiled(monkeypatch, getattr(SP, f"_verify_with_{slow}"))
    try:
        dr.verify_step = SP.compile_verify(half, dr, "cpu")
        assert dr.verify_template is (slow == "library")
        counters.clear()
        got, st = SP.speculative_generate(half, dr, prompt, 16)
        assert not counters["recompiles"] and st["rounds"] > 1
        assert got[:8] == ref[:8]     # bf16 kernels round differently: near-ties may flip later
    finally:
        torch._dynamo.reset()
