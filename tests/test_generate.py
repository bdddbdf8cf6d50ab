"""generate.py: the plain decode loop against transformers, batching, stops, cache limits, torch.compile,
and the CLI end to end on a tiny checkpoint with a tiny tokenizer."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import generate
import tiny
from checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [1, 5, 9, 33, 100, 7, 64]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "model.pth"
    return tiny.write_checkpoint(path)


@pytest.fixture
def model(tiny_ckpt):
    generate.use_eager()
    return load_model(tiny_ckpt[0], "cpu", torch.float32)


def hf_greedy(hf, prompt, n):
    hf.generation_config.eos_token_id = None  # run the full n tokens, as generate() does without stop ids
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_greedy_matches_transformers(tmp_path, tied):
    path, hf, _ = tiny.write_checkpoint(tmp_path / "m.pth", tie_word_embeddings=tied, num_key_value_heads=2)
    m = load_model(path, "cpu", torch.float32)
    tokens, stats = generate.generate(m, torch.tensor(PROMPT), 32)
    assert tokens[0] == hf_greedy(hf, PROMPT, 32)
    assert stats["new_tokens"] == 32 and stats["decode_steps"] == 31 and stats["prompt_tokens"] == len(PROMPT)
    assert stats["decode_tokens_per_s"] > 0 and stats["time_to_first_token_s"] > 0


def test_batch_equals_single_rows(model):
    a, b = PROMPT, [3, 200, 17, 8, 8, 150, 42]
    batch, _ = generate.generate(model, torch.tensor([a, b]), 24)
    single = [generate.generate(model, torch.tensor(p), 24)[0][0] for p in (a, b)]
    assert batch == single
    assert batch[0] != batch[1]  # otherwise the test could not tell the rows apart


def test_stops_at_stop_id_per_row(model):
    a, b = PROMPT, [3, 200, 17, 8, 8, 150, 42]
    free = [generate.generate(model, torch.tensor(p), 24)[0][0] for p in (a, b)]
    stop = free[0][4]  # a token row 0 produces early; row 1 may or may not produce it
    tokens, stats = generate.generate(model, torch.tensor([a, b]), 24, stop_ids=[stop])
    for row, full in zip(tokens, free):
        want = full[:full.index(stop) + 1] if stop in full else full
        assert row == want
    assert tokens[0][-1] == stop and len(tokens[0]) <= 5
    assert stats["new_tokens"] == len(tokens[0]) + len(tokens[1])


def test_callback_streams_every_token(model):
    seen = []
    tokens, _ = generate.generate(model, torch.tensor(PROMPT), 10, callback=lambda row, ids: seen.extend(ids))
    assert seen == tokens[0] and len(seen) == 10


def test_max_new_tokens_and_cache_end(model):
    for n in (1, 2, 9):
        assert len(generate.generate(model, torch.tensor(PROMPT), n)[0][0]) == n
    # A cache exactly prompt + n long is used as is (no reallocation) and suffices.
    n = 20
    model.setup_caches(1, len(PROMPT) + n)
    k_cache = model.layers[0].attention.kv_cache.k_cache
    tokens, _ = generate.generate(model, torch.tensor(PROMPT), n)
    assert model.layers[0].attention.kv_cache.k_cache is k_cache and len(tokens[0]) == n
    # One more token does not fit: generate allocates a larger cache (rounded to 256) instead of
    # writing past the end, and the tokens are the same.
    longer, _ = generate.generate(model, torch.tensor(PROMPT), n + 1)
    assert model.max_seq_length == 256 and longer[0][:n] == tokens[0]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate.generate(model, torch.tensor(PROMPT), 600)


def test_start_pos_reuses_cached_prefix(model):
    first, _ = generate.generate(model, torch.tensor(PROMPT), 6)
    # the next "turn": the previous prompt + reply (all but the last token are in the cache) + new text
    follow = PROMPT + first[0] + [11, 12]
    cached = len(PROMPT) + len(first[0]) - 1
    reused, _ = generate.generate(model, torch.tensor(follow), 8, start_pos=cached)
    fresh, _ = generate.generate(model, torch.tensor(follow), 8)
    assert reused == fresh


def test_sampling_uses_shared_sampler(model):
    greedy, _ = generate.generate(model, torch.tensor(PROMPT), 12)
    top1, _ = generate.generate(model, torch.tensor(PROMPT), 12, temperature=1.0, top_k=1)
    assert top1 == greedy
    torch.manual_seed(3)
    s1, _ = generate.generate(model, torch.tensor(PROMPT), 12, temperature=5.0)
    torch.manual_seed(3)
    s2, _ = generate.generate(model, torch.tensor(PROMPT), 12, temperature=5.0)
    assert s1 == s2 and s1 != greedy  # at temperature 5 the random draws leave the greedy path


def test_compiled_decode_matches_eager_without_recompiles(tiny_ckpt):
    """One Inductor compile per test session (tens of seconds on a small CPU)."""
    from torch._dynamo.utils import counters
    m = load_model(tiny_ckpt[0], "cpu", torch.float32)
    prompt = torch.tensor(PROMPT)
    m.setup_caches(1, 256)
    generate.use_eager()
    eager, _ = generate.generate(m, prompt, 200)
    try:
        torch._dynamo.reset()
        counters.clear()
        generate.compile_decode(model=m)   # fp32 on CPU: the autotuned C++ GEMM template
        warm, _ = generate.generate(m, prompt, 200)  # compiles here, once for every attention width
        assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
        counters.clear()
        again, _ = generate.generate(m, prompt, 200)
        assert counters["stats"]["unique_graphs"] == 0 and not counters["recompiles"]
        # A second model through the same compiled step: decode loops skip Dynamo's guards after their
        # first step (generate.skip_guards), and with weights frozen into each graph a wrong entry would
        # silently decode the other model. The guards that tell the two entries apart must still run.
        other = load_model(tiny_ckpt[0], "cpu", torch.float32)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(-1.5)
        other.setup_caches(1, 256)
        generate.use_eager()
        other_eager, _ = generate.generate(other, prompt, 60)
        assert other_eager[0][:60] != eager[0][:60]
        generate.compile_decode(model=other)
        other_compiled, _ = generate.generate(other, prompt, 60)
        back, _ = generate.generate(m, prompt, 60)
    finally:
        generate.use_eager()
    assert warm == eager and again == eager
    assert other_compiled == other_eager and back[0] == eager[0][:60]


# ---------------------------------------------------------------------------------------------------
# CLI end to end (subprocess) on a tiny checkpoint directory with a tiny tokenizer
# ---------------------------------------------------------------------------------------------------

def run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
          "You are a tiny test model.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_model_dir(d, vocab_size=320):
    """A checkpoint directory like a converted hub model: model.pth + config.json + a byte-level BPE
    tokenizer.json (trained here on a few sentences) + tokenizer_config.json with a ChatML template.
    Special tokens take ids 0-2 as in SmolLM2, so the config's eos_token_id=2 is <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                  "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the cat sat on the mat", "what is the capital of France? Paris is.", "hello there, and again",
            "a tiny model says tiny things", "be brief and kind"] * 20
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": False}))
    cfg = tiny.tiny_config(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    (d / "config.json").write_text(json.dumps(cfg))
    tiny.write_checkpoint(d / "model.pth", cfg)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("tokenizer", reason="tokenizer.py has not landed")
    return write_tiny_model_dir(tmp_path_factory.mktemp("cli"))


def test_cli_streams_text_matching_json(tiny_dir):
    ckpt = str(tiny_dir / "model.pth")
    common = ["--checkpoint", ckpt, "--prompt", "the cat sat", "--max-new-tokens", "20", "--dtype", "fp32",
              "--device", "cpu"]
    js = run_cli(*common, "--json")
    assert js.returncode == 0, js.stderr
    rec = json.loads(js.stdout.strip().splitlines()[-1])
    for key in ("text", "tokens", "new_tokens", "decode_tokens_per_s", "time_to_first_token_s",
                "bandwidth_gb_s", "prompt_tokens", "finish_reason"):
        assert key in rec
    assert rec["new_tokens"] == len(rec["tokens"]) and rec["new_tokens"] <= 20
    plain = run_cli(*common)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.rstrip("\n") == rec["text"]
    assert "tok/s" in plain.stderr and "GB/s" in plain.stderr and "time to first token" in plain.stderr


def test_cli_chat_batch_and_samples(tiny_dir, tmp_path):
    ckpt = str(tiny_dir / "model.pth")
    trace = tmp_path / "trace.json"
    r = run_cli("--checkpoint", ckpt, "--chat", "--system", "be brief", "--prompt", "hi", "--json",
                "--profile", str(trace),
                "--max-new-tokens", "8", "--batch-size", "2", "--num-samples", "2", "--temperature", "0.8",
                "--top-k", "50", "--top-p", "0.9", "--seed", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [(x["sample"], x["row"]) for x in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(x["new_tokens"] <= 8 for x in recs)
    assert "traceEvents" in json.loads(trace.read_text())


def test_cli_speculative_lookup_matches_plain(tiny_dir):
    common = ["--checkpoint", str(tiny_dir / "model.pth"), "--prompt", "the cat sat on the mat, the cat sat",
              "--max-new-tokens", "16", "--dtype", "fp32", "--device", "cpu", "--json"]
    plain = run_cli(*common)
    spec = run_cli(*common, "--speculate", "--spec-method", "lookup", "--compare-ar")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert json.loads(spec.stdout)["tokens"] == json.loads(plain.stdout)["tokens"]
    assert "speculative speedup" in spec.stderr and "tokens per target step" in spec.stderr


def test_cli_interactive_two_turns(tiny_dir):
    ckpt = str(tiny_dir / "model.pth")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--checkpoint", ckpt,
                        "--interactive", "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32"],
                       input="hello there\nand again\n", capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("tok/s") == 2
    # the second turn re-renders the conversation; everything up to the first reply is reused from the cache
    assert r.stderr.count("already cached") == 1


def test_real_model_knows_paris(request):
    try:
        model_dir = request.getfixturevalue("smollm2_dir")
    except pytest.FixtureLookupError:
        pytest.skip("no smollm2_dir fixture")
    ckpt = os.path.join(str(model_dir), "model.pth")
    model, tok = generate.load_target(ckpt, "cpu", torch.float32)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    tokens, _ = generate.generate(model, torch.tensor(ids), 20, stop_ids=tok.stop_ids)
    assert "Paris" in tok.decode(tokens[0])


def test_gemm_template_choice():
    """fp32 and weight-only quantized models compile with Inductor's C++ GEMM template; a bf16 model's
    decode step follows what choose_half_gemm measures for it, its other steps keep oneDNN."""
    import model as M
    import quantize
    m = M.Transformer(M.ModelArgs(dim=64, n_layer=1, n_head=4, intermediate_size=128, vocab_size=50))
    assert generate.gemm_template_pays(m) and not generate._undecided_half(m)
    half = copy.deepcopy(m).to(torch.bfloat16)
    assert not generate.gemm_template_pays(half) and generate._undecided_half(half)
    half.half_gemm_template = True
    assert not generate.gemm_template_pays(half) and not generate._undecided_half(half)
    assert generate.gemm_template_pays(quantize.swap_linears(m, {"mode": "int8"}))
    assert not generate.gemm_template_pays(None)


def test_gemm_micro_kernels_are_forced_inline():
    """generate.inline_gemm_micro_kernels patches the text of Inductor's GEMM template: pin that it applies
    to the PyTorch this project pins (a reworded template would silently lose the fix), reaches the code a
    five-row fp32 matmul compiles to (a row count whose kernel GCC left out of line), keeps its result, and
    is in the FX-graph cache key; and that bf16 weights are loaded without the counted load that kept the
    accumulators on the stack."""
    generate.cpu_inductor_settings()   # frozen weights: what the template needs; applies the patch
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen import cpp_micro_gemm   # after the line above: Inductor's import order
    from torch._inductor.utils import run_and_get_code
    assert generate.inline_gemm_micro_kernels() and generate.inline_gemm_micro_kernels()   # idempotent
    for cls in (cpp_micro_gemm.CppMicroGemmFP32Vec, cpp_micro_gemm.CppMicroGemmWoQInt4Avx512):
        assert generate._MICRO_GEMM_DECL not in cls.TEMPLATE_KERNEL
        assert generate._MICRO_GEMM_INLINE in cls.TEMPLATE_KERNEL
    assert inductor_config.post_grad_custom_post_pass.uuid()
    lin = torch.nn.Linear(64, 96, bias=False)
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    options = dict(generate.GEMM_TEMPLATE_OPTIONS, max_autotune_gemm_backends="CPP")
    with torch.no_grad():
        y, codes = run_and_get_code(torch.compile(lin, fullgraph=True, options=options), x)
        torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
    code = "\n".join(codes)
    assert "micro_gemm" in code and "__attribute__((always_inline)) inline void" in code
    # bf16 weights: the micro-kernel loads them with a plain full-width load (no counted load)
    assert generate._MICRO_GEMM_HALF_LOAD not in cpp_micro_gemm.CppMicroGemmFP32Vec.TEMPLATE_KERNEL
    half, xh = lin.to(torch.bfloat16), torch.randn(6, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        y, codes = run_and_get_code(torch.compile(half, fullgraph=True, options=generate.TEMPLATE_ONLY_OPTIONS), xh)
        torch.testing.assert_close(y.float(), xh.float() @ half.weight.float().T, rtol=0.02, atol=0.02)
    assert generate._MICRO_GEMM_HALF_LOAD_FIXED in "\n".join(codes)
    # bf16 x bf16 on a CPU with AVX512-BF16: pairs of k through vdpbf16ps (an odd K leaves its last step to the
    # FMA loop), and the FX-graph cache key says so. Checked against fp32 math at 1, 4 and 8 rows.
    dp = torch.cpu._is_avx512_bf16_supported()
    assert ("vdpbf16ps" in cpp_micro_gemm.CppMicroGemmFP32Vec.TEMPLATE_KERNEL) == dp
    assert inductor_config.post_grad_custom_post_pass.uuid().endswith("-dpbf16") == dp
    if dp and not torch.cpu._is_amx_tile_supported():     # with AMX, bf16 matmuls take the AMX micro-kernel
        assert "vdpbf16ps" in "\n".join(codes)
    odd = torch.nn.Linear(65, 96, bias=False).to(torch.bfloat16)
    for rows in (1, 4, 8):
        torch._dynamo.reset()
        xo = torch.randn(rows, 65, dtype=torch.bfloat16)
        with torch.no_grad():
            y = torch.compile(odd, fullgraph=True, options=generate.TEMPLATE_ONLY_OPTIONS)(xo)
        torch.testing.assert_close(y.float(), xo.float() @ odd.weight.float().T, rtol=0.02, atol=0.02)
    torch._dynamo.reset()


def test_half_precision_template_step_runs_every_matmul_on_the_template(tiny_ckpt, monkeypatch):
    """A bf16 step compiled with the template (template=True, as choose_half_gemm / choose_half_verify compile
    one candidate), and a weight-only int8 one, offer the autotuner no library kernel: timing each matmul
    alone, it picked oneDNN for some of a real verify's few-row matmuls and ATen's int8 kernel for one-row
    ones (generate.TEMPLATE_ONLY_OPTIONS). On this tiny model it would pick the template anyway, so the
    options are checked as well as the code."""
    from torch._inductor.utils import run_and_get_code
    m = load_model(tiny_ckpt[0], "cpu", torch.bfloat16)
    m.setup_caches(1, 64)
    seen = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("options")) or real_compile(fn, **kw))
    generate.compile_step(lambda x: x, m, "cpu", template=True)
    generate.compile_step(lambda x: x, copy.deepcopy(m).float(), "cpu")
    import quantize
    generate.compile_step(lambda x: x, quantize.quantize_module(copy.deepcopy(m), "int8"), "cpu")
    assert seen[0]["max_autotune_gemm_backends"] == "CPP" and seen[0]["max_autotune"]
    assert seen[1] == generate.GEMM_TEMPLATE_OPTIONS           # fp32: both lists measured the same
    assert seen[2] == generate.TEMPLATE_ONLY_OPTIONS           # int8: ATen's one-row kernel was the slow pick
    tokens, pos, mask = torch.tensor([PROMPT[:4]]), torch.arange(4), m.causal_rows(0, 4)
    torch._dynamo.reset()
    try:
        step = generate.compile_step(lambda t, p, k: m(t, p, k), m, "cpu", template=True)
        with torch.no_grad():
            out, codes = run_and_get_code(step, tokens, pos, mask)
            ref = m(tokens, pos, mask)
        code = "\n".join(codes)
        # 4 rows: 2 layers x (qkv, o, w13, w2) + the head, all template micro-GEMMs
        assert "micro_gemm" in code and "mkldnn._linear_pointwise" not in code and "extern_kernels.mm" not in code
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("slow", ["library", "template"])
def test_half_precision_decode_times_both_kernels_and_keeps_the_faster(tiny_ckpt, monkeypatch, slow):
    """compile_decode on a bf16 CPU model compiles the step both ways, keeps the one its timings favour
    (here rigged: one candidate's calls are made slow), records the choice for later steps, and the kept
    step decodes what eager decoding does."""
    from torch._dynamo.utils import counters
    m = load_model(tiny_ckpt[0], "cpu", torch.bfloat16)
    prompt = torch.tensor(PROMPT)
    m.setup_caches(1, 256)
    generate.use_eager()
    eager, _ = generate.generate(m, prompt, 24)
    tiny.slow_down_compiled(monkeypatch, getattr(generate, f"_decode_with_{slow}"))
    try:
        torch._dynamo.reset()
        step = generate.compile_decode(model=m)
        assert m.half_gemm_template is (slow == "library") and not generate.gemm_template_pays(m)
        counters.clear()
        compiled, _ = generate.generate(m, prompt, 24)
        assert not counters["recompiles"]
        assert compiled[0][:8] == eager[0][:8]   # bf16 kernels round differently: near-ties may flip later
        monkeypatch.setattr(generate, "choose_half_gemm", lambda *a, **k: pytest.fail("timed twice"))
        generate.compile_decode(model=m)                           # decided: a plain compile
    finally:
        generate.use_eager()
        torch._dynamo.reset()


def test_few_rows_attention_matches_sdpa():
    """The compiled CPU decode path's attention (model.few_rows_attention) against SDPA: batch 2, masked
    slots (a tree-like mask, not only a causal prefix), fp32 tight and bf16 at bf16's resolution."""
    import torch.nn.functional as F
    import model as M
    g = torch.Generator().manual_seed(0)
    B, H, R, W, D = 2, 3, M.FEW_ROWS, 70, 16
    mask = torch.rand(B, 1, R, W, generator=g) < 0.6
    mask[..., 0] = True                        # every row sees at least one slot
    fused = torch.compile(M.few_rows_attention, fullgraph=True, dynamic=False)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (R, W, W))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        out = fused(q, k, v, mask)
        assert out.dtype == dtype
        assert (out.float() - ref).abs().max().item() < tol


needs_avx512 = pytest.mark.skipif(not torch.cpu._is_avx512_supported(),
                                  reason="attention_cpu.cpp is built for AVX-512 CPUs only")


@needs_avx512
def test_cpu_attention_kernel_matches_sdpa():
    """attention_cpu.cpp against SDPA on fp32-upcast inputs: each dtype, head dims 16..128 (odd multiples of
    16 too), rows stacked over a smaller mask (GQA), widths not a multiple of 16, strided cache views, a
    per-batch mask, and a row whose visible slots all fall in the first of the slot chunks the two threads
    split (the other chunk adds nothing)."""
    import torch.nn.functional as F
    op = generate.load_cpu_attention()
    assert op is not None, "the kernel must build on an AVX-512 CPU with a compiler"
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
            for D in (16, 48, 64, 128):
                for B, H, R, W, Rm in ((1, 3, 3, 320, 1), (1, 3, 24, 301, 8), (2, 2, 5, 17, 5), (1, 1, 1, 1, 1),
                                       (2, 3, 12, 200, 4)):
                    q = torch.randn(B, H, R, D, generator=g).to(dtype)
                    k, v = (torch.randn(B, H, W + 9, D, generator=g).to(dtype)[:, :, :W] for _ in range(2))
                    mask = torch.rand(B, 1, Rm, W, generator=g) < 0.6
                    mask[..., 0] = True
                    mask[:, :, -1, max(1, W // 4):] = False  # last mask row: only the first quarter visible
                    rows = mask.repeat(1, 1, R // Rm, 1)        # stacked row r uses mask row r % Rm
                    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=rows)
                    out = op(q, k, v, mask)
                    assert out.dtype == dtype and out.shape == q.shape
                    err = (out.float() - ref).abs().max().item()
                    assert err < tol, (dtype, D, B, H, R, W, Rm, err)
                    # a whole cache wider than the mask: only the mask's W slots are read (model passes the
                    # cache unsliced to save the compiled step two views per layer)
                    wide_k, wide_v = (torch.cat([t, torch.full_like(t[:, :, :5], 1e4)], 2) for t in (k, v))
                    assert torch.equal(op(q, wide_k, wide_v, mask), out)
    finally:
        torch.set_num_threads(threads)


@needs_avx512
def test_cpu_attention_kernel_rows_do_not_depend_on_their_neighbours():
    """A row's result must be bit-identical whether it comes alone (a decode step) or with the rows of a tree
    verify: greedy speculative decoding in fp32 relies on the verify reproducing what plain decoding computes."""
    op = generate.load_cpu_attention()
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 3, 24, 64, generator=g).to(dtype)
        k, v = (torch.randn(1, 3, 300, 64, generator=g).to(dtype) for _ in range(2))
        mask = torch.rand(1, 1, 24, 300, generator=g) < 0.7
        mask[..., 0] = True
        together = op(q, k, v, mask)
        for r in (0, 5, 23):
            alone = op(q[:, :, r:r + 1], k, v, mask[:, :, r:r + 1])
            assert torch.equal(alone, together[:, :, r:r + 1])


@needs_avx512
@pytest.mark.parametrize("kernel", [True, False])
def test_compiled_forward_attention_with_and_without_the_kernel(tiny_ckpt, monkeypatch, kernel):
    """A compiled CPU forward of a few tokens calls the C++ kernel when it is loaded (and the PyTorch loops
    when it is not); both match the eager forward (SDPA)."""
    from torch._inductor.utils import run_and_get_code
    import model as M
    op = generate.load_cpu_attention()
    monkeypatch.setattr(M, "FEW_ROWS_KERNEL", op if kernel else None)
    m = load_model(tiny_ckpt[0], "cpu", torch.float32)
    m.setup_caches(1, 64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.args.vocab_size, (1, 12), generator=g)
    with torch.no_grad():
        m(tokens[:, :8], torch.arange(8), m.causal_rows(0, 8))
        eager = m(tokens[:, 8:], torch.arange(8, 12), m.causal_rows(8, 12))
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(m, fullgraph=True), tokens[:, 8:], torch.arange(8, 12),
                                      m.causal_rows(8, 12))
    torch._dynamo.reset()
    assert ("eaglet.few_rows_attention" in "\n".join(codes)) is kernel
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_rope_is_the_eager_rope_without_a_concatenation(dtype):
    """Compiled, rotate_half rotates by a roll and a sign instead of chunk + cat: Inductor writes a cat into one
    buffer through two aliased halves, and each alias is a Python call in the compiled step's wrapper (4 a
    layer, 120 a SmolLM2 decode step). The values must be bit-identical to the compiled chunk + cat (HF's
    rotate_half), in every dtype, so that the change is invisible to every compiled forward."""
    from torch._inductor.utils import run_and_get_code
    import model as M
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 5, 64, generator=g).to(dtype)
    cos, sin = (t[:5][None, None].to(dtype) for t in M.rope_cache(M.ModelArgs(head_dim=64, rope_base=1e4), 5))
    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(M.apply_rope, fullgraph=True), x, cos, sin)
    hf = lambda x, cos, sin: x * cos + torch.cat((-x[..., 32:], x[..., :32]), dim=-1) * sin  # HF's rotate_half
    cat = torch.compile(hf, fullgraph=True)(x, cos, sin)
    torch._dynamo.reset()
    assert torch.equal(out, cat)
    # against eager: compiled rounds once where eager rounds each op (bf16: an ulp here and there)
    tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(out, M.apply_rope(x, cos, sin), **tol)
    assert "reinterpret_tensor(" not in "\n".join(codes)


def test_realized_query_is_computed_once_not_per_cache_slot():
    """model._realized must make Inductor store q in a buffer of its own: if the prim stops doing that (a
    PyTorch upgrade), q's RoPE moves back into the score loop, recomputed for every slot, and attention in
    a verify gets ~1.5x slower without any test noticing. Counted as buffers the compiled code allocates."""
    from torch._inductor.utils import run_and_get_code
    import model as M
    g = torch.Generator().manual_seed(0)
    q, cos, sin = (torch.randn(1, 3, 4, 16, generator=g) for _ in range(3))
    k = torch.randn(1, 3, 64, 16, generator=g)

    def scores(realize):
        def f(q, cos, sin, k):
            qr = M.apply_rope(q, cos, sin)
            qr = M._realized(qr) if realize else qr
            return (qr.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1).softmax(-1)
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(f, fullgraph=True), q, cos, sin, k)
        return out, "\n".join(codes).count("empty_strided_cpu(")
    (plain, n_plain), (realized, n_realized) = scores(False), scores(True)
    torch.testing.assert_close(plain, realized)
    assert n_realized == n_plain + 1


def test_tree_mask_is_computed_once_per_forward_not_per_layer(tiny_ckpt, monkeypatch):
    """A tree verify builds its mask in the graph (prefix slots, then the tree's ancestor mask); model's
    _shared_mask must store it in one buffer that every layer reads. Left inline, Inductor recomputes it
    inside each layer's attention loops (~1.5% of an fp32 SmolLM2 verify). Counted as buffers the compiled
    code allocates, with the mask left inline as the baseline."""
    from torch._inductor.utils import run_and_get_code
    import model as M
    import speculative as SP
    m = load_model(tiny_ckpt[0], "cpu", torch.float32)
    m.setup_caches(1, 64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.args.vocab_size, (4,), generator=g)
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    L, cols = torch.tensor(9), torch.arange(32)

    def f(tokens, L, cols, anc):
        mask = SP.prefix_and_tree_mask(L, cols, anc)[None, None]
        return m(tokens[None], L + torch.arange(4), mask, L + anc.sum(1) - 1)

    def run(share):
        monkeypatch.setattr(M, "FEW_ROWS_KERNEL", None)   # the PyTorch loops (the C++ kernel reads the mask once)
        if not share:
            monkeypatch.setattr(M, "_shared_mask", lambda mask: mask)
        torch._dynamo.reset()
        with torch.no_grad():
            out, codes = run_and_get_code(torch.compile(f, fullgraph=True), tokens, L, cols, anc)
        monkeypatch.undo()
        return out, "\n".join(codes).count("empty_strided_cpu(")
    (inline, n_inline), (shared, n_shared) = run(False), run(True)
    torch._dynamo.reset()
    torch.testing.assert_close(inline, shared)
    assert n_shared == n_inline + 1


def test_skipped_guards_pick_the_entry_of_each_temperature(tiny_ckpt, monkeypatch):
    """One compiled decode step holding an entry per sampling setting (temperature, top_k are Python values
    the graph specializes on): with guards skipped after each loop's first step (generate.skip_guards),
    every generation must still run its own entry, i.e. equal a run with every guard checked."""
    import contextlib
    m = load_model(tiny_ckpt[0], "cpu", torch.float32)
    m.setup_caches(1, 256)
    prompt = torch.tensor(PROMPT)
    settings = ((0.0, None), (1.0, 20), (0.0, None), (0.7, None), (1.0, 20))

    def runs():
        out = []
        for temperature, top_k in settings:
            torch.manual_seed(7)
            out.append(generate.generate(m, prompt, 80, temperature=temperature, top_k=top_k)[0])
        return out
    try:
        torch._dynamo.reset()
        generate.compile_decode(model=m)
        skipped = runs()
        monkeypatch.setattr(generate, "skip_guards", contextlib.nullcontext)
        checked = runs()
    finally:
        generate.use_eager()
    assert skipped == checked
    assert skipped[0] != skipped[1] and skipped[3] != skipped[4]   # the settings do lead to different text


def _resident_bytes(t: torch.Tensor) -> int:
    """Bytes of tensor t's pages that are in memory (mincore)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = os.sysconf("SC_PAGE_SIZE")
    lo = t.data_ptr() // page * page
    n = -(-(t.data_ptr() + t.numel() * t.element_size() - lo) // page)
    vec = ctypes.create_string_buffer(n)
    assert libc.mincore(lo, n * page, vec) == 0
    return sum(b & 1 for b in vec.raw) * page


def _pages_of(t: torch.Tensor) -> dict:
    """Rss and AnonHugePages (bytes) of the mappings that hold tensor t, from /proc/self/smaps (a mapping can
    be larger than t: the kernel merges neighbouring anonymous mappings)."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    got, inside = {"Rss:": 0, "AnonHugePages:": 0}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                a, b = (int(v, 16) for v in head[0].split("-"))
                inside = a < hi and lo < b
            elif inside and head[0] in got:
                got[head[0]] += int(head[1]) * 1024
    return got


def _needs_madv_collapse():
    if not sys.platform.startswith("linux"):
        pytest.skip("MADV_COLLAPSE is Linux's")
    if tuple(int(v) for v in os.uname().release.split("-")[0].split(".")[:2]) < (6, 1):
        pytest.skip("MADV_COLLAPSE needs Linux 6.1")
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[always]" in f.read():
            pytest.skip("THP is 'always' here: fresh tensors are on huge pages already")


def _fresh(n: int, touch: bool = True) -> torch.Tensor:
    """n bytes of a new private anonymous mapping of its own (not memory torch or glibc recycled, which may be
    resident or on huge pages already), filled with a pattern if touch."""
    import mmap
    t = torch.frombuffer(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE), dtype=torch.uint8)   # t keeps the mapping
    if touch:
        t.copy_((torch.arange(n, dtype=torch.int32) % 251).to(torch.uint8))
    return t


def test_huge_pages_moves_resident_memory_onto_2mib_pages_and_leaves_the_rest():
    _needs_madv_collapse()
    weights = _fresh(48 << 20)
    expected = weights.clone()
    untouched = _fresh(64 << 20, touch=False)              # reserved, never written: must not grow
    before = _pages_of(weights)
    moved = generate.huge_pages()
    after = _pages_of(weights)
    assert moved >= 44 << 20 and after["AnonHugePages:"] >= 44 << 20, (moved, before, after)  # all but the ends
    assert torch.equal(weights, expected)                  # the same bytes, on other pages
    assert _resident_bytes(untouched) < 4 << 20            # not faulted in
    assert generate.huge_pages() < 4 << 20                 # what moved stays moved: a second call has ~nothing to do


def test_huge_pages_of_given_tensors_moves_only_theirs():
    _needs_madv_collapse()
    a, b = _fresh(48 << 20), _fresh(48 << 20)
    moved_a = generate.huge_pages([a[1000:]])              # a view: its whole storage moves
    assert 44 << 20 <= moved_a <= 52 << 20, moved_a       # a's blocks (and at most its neighbours' ends), not b's
    moved_b = generate.huge_pages([b])
    assert 44 << 20 <= moved_b <= 52 << 20, moved_b


def test_large_cpu_tensors_finds_tensors_no_module_holds():
    from torch._subclasses.fake_tensor import FakeTensorMode
    hidden = {"constants": [torch.ones(1 << 20)]}          # as a compiled graph holds its prepacked weights
    small = torch.ones(16)
    with FakeTensorMode():
        fake = torch.empty(1 << 20)                        # no memory: must be skipped, not raise
    meta = torch.empty(1 << 20, device="meta")
    found = {t.data_ptr() for t in generate.large_cpu_tensors()}
    assert hidden["constants"][0].data_ptr() in found
    assert small.data_ptr() not in found
    del fake, meta


def test_huge_pages_flag(tiny_ckpt):
    parse = generate.build_parser().parse_args
    bf16 = load_model(tiny_ckpt[0], "cpu", torch.bfloat16)
    fp32 = load_model(tiny_ckpt[0], "cpu", torch.float32)
    assert not generate.wants_huge_pages(parse([]), bf16)                        # 200 tokens: not worth ~1 s
    assert generate.wants_huge_pages(parse(["--max-new-tokens", "2048"]), bf16)
    assert generate.wants_huge_pages(parse(["--num-samples", "11"]), bf16)      # 11 x 200 tokens
    assert generate.wants_huge_pages(parse(["--interactive"]), bf16)
    assert not generate.wants_huge_pages(parse(["--interactive"]), fp32)        # gains too little for the cost
    assert generate.wants_huge_pages(parse(["--huge-pages", "on"]), fp32)
    assert not generate.wants_huge_pages(parse(["--huge-pages", "off", "--interactive"]), bf16)
