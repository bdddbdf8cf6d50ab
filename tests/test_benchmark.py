"""scripts/benchmark.py end to end on a tiny random model (real loader, tokenizer, decode loops and drafter),
its statistics on hand-made records, bad arguments, and the README Performance generator."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
import readme_perf  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
        "Speculative decoding drafts tokens and the target verifies them in one forward pass. ") * 20


def write_tiny_dir(d: Path) -> Path:
    """A checkpoint directory like the real one: model.pth, the HF files of the same weights
    (config.json + model.safetensors, for --peer hf) and a byte-level BPE tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in
                                 enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}}))
    cfg = tiny.tiny_config(vocab_size=320, bos_token_id=0, eos_token_id=2, max_position_embeddings=1024)
    _, hf, _ = tiny.write_checkpoint(d / "model.pth", cfg)
    hf.save_pretrained(d)
    # an untrained EAGLE draft: it proposes junk, which is exactly what must not change greedy output
    import torch
    import eagle_draft
    from model import ModelArgs
    torch.manual_seed(1)
    eagle_draft.save_draft(eagle_draft.EagleDraft(ModelArgs.from_hf_config(cfg)), d / "draft.pth", cfg)
    return d / "model.pth"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_dir(tmp_path_factory.mktemp("tiny") / "m")


def run_bench(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_end_to_end_tiny_model(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "q1", "turns": ["the quick brown fox", "return a + b"]}) + "\n"
                       + json.dumps({"prompt": "never measured: --limit 1"}) + "\n")
    out = tmp_path / "out"
    readme = tmp_path / "README.md"
    readme.write_text("# tiny\n<!-- perf:start -->\n<!-- perf:end -->\n")
    # draft: the target itself as the separate draft LM (accepts everything: the other extreme from eagle)
    r = run_bench("--checkpoint", tiny_ckpt, "--prompts", prompts, "--limit", 1, "--turns", 2, "--methods",
                  "ar,lookup,eagle,draft", "--precisions", "fp32", "--temperature", "0,1", "--max-new-tokens", 12,
                  "--draft", tiny_ckpt.parent / "draft.pth", "--draft-checkpoint", tiny_ckpt,
                  "--device", "cpu", "--peer", "hf", "--out", out, "--readme", readme)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| fp32 | 0 | lookup | 2 |" in readme.read_text() and "](out/results.png)" in readme.read_text()

    res = json.loads((out / "results.json").read_text())
    assert res["command"].startswith("python ") and "--methods ar,lookup,eagle,draft" in res["command"]
    assert {"cpu", "cores", "threads", "torch", "date"} <= set(res["machine"])
    assert res["roofline"]["bandwidth_gb_s"] > 0 and res["roofline"]["tok_s"]["fp32"] > 0
    # one short probe per prompt, temperature and precision: here 1 x 2 x 1
    assert len(res["roofline"]["prompt_probes_gb_s"]) == 2
    assert res["roofline"]["bandwidth_gb_s"] == max(res["roofline"]["bandwidth_samples_gb_s"]
                                                    + res["roofline"]["prompt_probes_gb_s"])
    assert res["wall_s"] > 0 and "the whole run took" in readme.read_text()
    recs = res["records"]
    methods = {"ar", "lookup", "eagle", "draft", "hf", "hf-lookup"}
    # 1 prompt x 2 turns x 2 temperatures x 6 runners, none from the warm-up
    assert len(recs) == 24 and {r["method"] for r in recs} == methods
    for rec in recs:
        assert rec["prompt_id"] == "q1" and 1 <= rec["new_tokens"] <= 12 and len(rec["tokens"]) == rec["new_tokens"]
        assert rec["decode_s"] >= 0 and rec["ttft_s"] > 0 and rec["peak_mem_bytes"] > 0 and rec["probe_gb_s"] > 0
    by = {(r["temperature"], r["method"], r["turn"]): r for r in recs}
    # turn 2 carries turn 1 and ar's answer to it
    assert by[(0.0, "ar", 2)]["prompt_tokens"] > by[(0.0, "ar", 1)]["prompt_tokens"] + by[(0.0, "ar", 1)]["new_tokens"]
    # fp32 greedy: prompt lookup is lossless and transformers runs the same weights, so the same tokens
    for m in ("lookup", "eagle", "draft", "hf", "hf-lookup"):
        for turn in (1, 2):
            assert by[(0.0, m, turn)]["tokens"] == by[(0.0, "ar", turn)]["tokens"], (m, turn)
            assert by[(0.0, m, turn)]["same_as_ar"] is True
        assert by[(1.0, m, 1)]["same_as_ar"] is None
    assert by[(0.0, "lookup", 1)]["rounds"] >= 1 and by[(0.0, "lookup", 1)]["mean_accepted"] >= 1
    # the target drafting for itself: every drafted token is accepted, so τ is the chain length + 1
    draft_rec = by[(0.0, "draft", 1)]
    assert sum(draft_rec["accept_hist"][:-1]) <= 1 and draft_rec["mean_accepted"] > 2

    rows = {(r["temperature"], r["method"]): r for r in res["summary"]}
    assert set(rows) == {(t, m) for t in (0.0, 1.0) for m in methods}
    for (t, m), row in rows.items():
        assert row["n"] == 2 and row["tok_s"] > 0 and row["speedup"] > 0 and row["ttft_ms_median"] > 0
        assert row["tau"] is None if m.startswith("hf") else row["tau"] >= 1
    assert rows[(0.0, "ar")]["speedup"] == pytest.approx(1.0) and rows[(0.0, "ar")]["bandwidth_gb_s"] > 0
    assert rows[(0.0, "ar")]["vs_base_ar"] == pytest.approx(1.0) and rows[(0.0, "ar")]["paired_roofline_fraction"] > 0
    # resident weights + caches are part of every configuration's memory
    assert rows[(0.0, "ar")]["peak_mem_mb"] * 2**20 >= res["roofline"]["model_bytes"]["fp32"]
    assert rows[(0.0, "lookup")]["identical"] == 2 and rows[(0.0, "lookup")]["compared"] == 2
    assert rows[(0.0, "eagle")]["identical"] == 2 and rows[(0.0, "draft")]["identical"] == 2
    assert len(rows[(0.0, "draft")]["accept_by_depth"]) >= 2 and rows[(0.0, "eagle")]["accept_hist"]
    # fp32 EAGLE gets lookup nodes by default; the share of rounds that had them is recorded
    assert 0 <= rows[(0.0, "eagle")]["lookup_round_share"] <= 1 and "lookup_round_share" not in rows[(0.0, "lookup")]
    assert rows[(0.0, "hf")]["identical"] == 2

    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| precision"))
    assert [c.strip() for c in header.strip("|").split("|")] == benchmark.TABLE_COLUMNS
    assert md.count("| fp32 |") == 12 and "| 2/2 |" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


@pytest.mark.parametrize("args, needle", [
    (["--methods", "ar,warp"], "--methods: unknown warp"),
    (["--precisions", "int3"], "--precisions: unknown int3"),
    (["--temperature", "hot"], "--temperature"),
    (["--limit", "0"], "--limit"),
    (["--limit", "x"], "--limit"),
    (["--peer", "vllm"], "--peer: unknown vllm"),
    (["--methods", "ar,draft"], "--draft-checkpoint"),
    (["--checkpoint", "/nonexistent/model.pth"], "checkpoint not found"),
    (["--prompts", "/nonexistent.jsonl"], "--prompts"),
    (["--readme", "/nonexistent/README.md"], "perf:start"),
    (["--lookup-branch", "-2"], "--lookup-branch must be >= 0"),
    (["--random-model", "llama-2-7b", "--methods", "ar,eagle"], "drop eagle"),
    (["--random-model", "llama-2-7b", "--methods", "ar", "--peer", "hf"], "drop hf"),
    (["--random-model", "/nonexistent/config.json", "--methods", "ar"], "--random-model: /nonexistent"),
])
def test_bad_arguments_one_line_exit_2(tiny_ckpt, capsys, args, needle):
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(tiny_ckpt), "--device", "cpu"] + args
    with pytest.raises(SystemExit) as e:
        from checkpoint import run_cli
        run_cli(lambda: benchmark.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_bad_jsonl_and_real_exit_code(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    r = run_bench("--checkpoint", tiny_ckpt, "--prompts", bad, "--device", "cpu", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f'error: {bad}:2: each line must be {{"prompt": "..."}} or {{"turns": ["...", ...]}}']


def test_prompt_sets():
    mt = benchmark.load_prompts("mt_bench", None, 1, False)
    assert len(mt) == 80 and all(len(p["turns"]) == 1 and not p["raw"] for p in mt)
    assert [len(p["turns"]) for p in benchmark.load_prompts("mt_bench", 3, 2, False)] == [2, 2, 2]
    he = benchmark.load_prompts("humaneval", 5, 2, False)
    assert len(he) == 5 and all(p["raw"] and p["turns"][0].lstrip().startswith(("def", "from", "import"))
                                for p in he)


def rec(method, prompt, tok_s, decode_s, new_tokens=10, rounds=None, mean_acc=None, hist=None, div=None, temp=0.0):
    return {"precision": "bf16", "temperature": temp, "method": method, "prompt_id": prompt, "turn": 1,
            "new_tokens": new_tokens, "decode_tok_s": tok_s, "decode_s": decode_s, "ttft_s": 0.01,
            "rounds": rounds, "mean_accepted": mean_acc, "accept_hist": hist, "peak_mem_bytes": 2**20,
            "same_as_ar": (div is None) if method != "ar" else None, "first_divergence": div}


def test_summary_statistics():
    recs = [rec("ar", "a", 10.0, 1.0), rec("ar", "b", 20.0, 3.0),               # ar: 70 tokens / 4 s
            rec("eagle", "a", 40.0, 0.5, rounds=4, mean_acc=2.5, hist=[1, 1, 2]),
            rec("eagle", "b", 30.0, 1.0, rounds=6, mean_acc=3.0, hist=[0, 2, 4], div=7)]
    rows = {r["method"]: r for r in benchmark.summarize(recs, {"bf16": 1e9}, {"tok_s": {"bf16": 35.0}})}
    ar, ea = rows["ar"], rows["eagle"]
    assert ar["tok_s"] == pytest.approx(70 / 4) and ar["tok_s_median"] == 15.0 and ar["speedup"] == 1.0
    assert ar["bandwidth_gb_s"] == pytest.approx(17.5) and ar["roofline_fraction"] == pytest.approx(0.5)
    assert ea["tok_s"] == pytest.approx(50 / 1.5) and ea["speedup"] == pytest.approx((50 / 1.5) / 17.5)
    assert ea["speedup_median"] == pytest.approx((4.0 + 1.5) / 2)
    assert ea["tau"] == pytest.approx((2.5 * 4 + 3.0 * 6) / 10)
    assert ea["accept_hist"] == [1, 3, 6] and ea["accept_by_depth"] == pytest.approx([0.9, 0.6])
    assert (ea["identical"], ea["compared"], ea["first_divergence_min"]) == (1, 2, 7)
    assert "identical" not in ar and ar["tau"] == 1.0
    assert "paired_roofline_fraction" not in ar                  # records without per-prompt probes
    assert benchmark.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert benchmark.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert benchmark.first_divergence([1, 2], [1, 2, 3]) == 2


def test_paired_roofline_uses_each_prompts_probe():
    # 1e9 bytes a token; prompt a: 10 tokens in 1 s beside a 20 GB/s probe, b: 60 tokens in 3 s beside 40 GB/s
    recs = [{**rec("ar", "a", 10.0, 1.0), "probe_gb_s": 20.0}, {**rec("ar", "b", 20.0, 3.0), "probe_gb_s": 40.0}]
    row = benchmark.summarize(recs, {"bf16": 1e9}, {"tok_s": {"bf16": 40.0}})[0]
    assert row["roofline_fraction"] == pytest.approx(17.5 / 40.0)         # against the best probe alone
    assert row["paired_roofline_fraction"] == pytest.approx(70e9 / (1.0 * 20e9 + 3.0 * 40e9))
    assert "(44% of roofline, 50% paired)" in benchmark.markdown_table([row])


def test_probe_buffer_is_what_it_measures():
    buf = benchmark._probe_buffer(8 << 20, "cpu")
    assert buf.dtype == torch.float32 and buf.numel() == 2 << 20 and bool((buf == 1).all())
    assert benchmark.measure_bandwidth("cpu", repeats=2, buffer=buf) > 0


def test_readme_perf_rewrites_only_the_block(tmp_path):
    recs = [rec("ar", "a", 10.0, 1.0), rec("lookup", "a", 15.0, 1.0, rounds=5, mean_acc=2.0, hist=[2, 3])]
    results = {"command": "python scripts/benchmark.py --limit 1", "config": {
        "n_prompts": 1, "prompts": "mt_bench", "max_new_tokens": 256, "compile": True},
        "machine": {"cpu": "Test CPU", "cores": 2, "threads": 2, "torch": "2.13.0", "date": "2026-11-23 12:00 UTC"},
        "roofline": {"bandwidth_gb_s": 10.0, "tok_s": {"bf16": 37.0}}, "wall_s": 90.0,
        "summary": benchmark.summarize(recs, {"bf16": 1e9}, {})}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "results.png").write_bytes(b"\x89PNG")
    readme = tmp_path / "README.md"
    readme.write_text("# x\nintro\n<!-- perf:start -->\nold numbers\n<!-- perf:end -->\nafter\n")
    readme_perf.main(["--results", str(tmp_path / "results.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# x\nintro\n<!-- perf:start -->\n") and text.endswith("<!-- perf:end -->\nafter\n")
    assert "old numbers" not in text and "python scripts/benchmark.py --limit 1" in text and "Test CPU" in text
    assert "the whole run took 1.5 min" in text
    assert "| bf16 | 0 | lookup | 1 | 15.0 |" in text and "![speedup and τ per method](results.png)" in text
    once = text
    readme_perf.main(["--results", str(tmp_path / "results.json"), "--readme", str(readme)])
    assert readme.read_text() == once  # idempotent

    readme.write_text("# no markers\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_perf.py"), "--results",
                        str(tmp_path / "results.json"), "--readme", str(readme)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "perf:start" in r.stderr


def test_quantized_precision_runs_a_quantized_draft(tiny_ckpt, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "the quick brown fox"}) + "\n")
    r = run_bench("--checkpoint", tiny_ckpt, "--prompts", prompts, "--limit", 1, "--methods", "ar,eagle",
                  "--precisions", "int8", "--max-new-tokens", 8, "--draft", tiny_ckpt.parent / "draft.pth",
                  "--device", "cpu", "--warmup", 0, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    qd = tiny_ckpt.parent / "draft_int8.pth"
    import torch
    assert torch.load(qd, weights_only=False)["quantization"]["mode"] == "int8"
    recs = json.loads((tmp_path / "out" / "results.json").read_text())["records"]
    assert {r["method"] for r in recs} == {"ar", "eagle"}


def test_random_model_rows_are_speed_only(tmp_path):
    """--random-model: a model of the given shape with random weights, no tokenizer, no stop tokens: every
    prompt decodes exactly --max-new-tokens, and every row says it is speed only."""
    import tiny
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny.tiny_config(vocab_size=320, max_position_embeddings=1024)))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "one two three four five"}) + "\n"
                       + json.dumps({"id": "b", "prompt": "six seven"}) + "\n")
    out = tmp_path / "out"
    r = run_bench("--random-model", cfg, "--prompts", prompts, "--methods", "ar,ar-eager", "--precisions",
                  "bf16,int4", "--max-new-tokens", 7, "--device", "cpu", "--warmup", 0, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["random_model"] == str(cfg) and res["config"]["checkpoint"] is None
    recs = res["records"]
    assert len(recs) == 8 and all(rec["new_tokens"] == 7 and rec["text"] == "" for rec in recs)
    # one random id per word of the prompt, the same for every method and precision
    assert {(rec["prompt_id"], rec["prompt_tokens"]) for rec in recs} == {("a", 5), ("b", 2)}
    assert all(row["speed_only"] and row["bandwidth_gb_s"] > 0 for row in res["summary"])
    md = (out / "results.md").read_text()
    assert md.count("(random weights: speed only)") == 4 and "random weights in the shape of" in md


def test_random_model_shapes_and_quantization():
    import torch
    import quantize
    m = benchmark.random_model("llama-2-7b", "bf16", "meta")     # the published shape, nothing allocated
    a = m.args
    assert (a.dim, a.n_layer, a.n_head, a.n_local_heads, a.intermediate_size, a.vocab_size) == \
        (4096, 32, 32, 32, 11008, 32000)
    assert sum(p.numel() for p in m.parameters()) == 6_738_415_616      # Llama-2-7B's parameter count
    import tiny
    cfg = tiny.tiny_config(tie_word_embeddings=True)
    x = benchmark.random_model
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(cfg))
        f1, f2 = x(str(path), "fp32", "cpu", seed=3), x(str(path), "fp32", "cpu", seed=3)
        assert all(torch.equal(p, q) for p, q in zip(f1.parameters(), f2.parameters()))    # seeded
        assert f1.output.weight is f1.tok_embeddings.weight and f1.norm.weight.eq(1).all()
        q4 = x(str(path), "int4", "cpu")
        # the layout quantize.py writes: int4 linears, the (tied) head its own int8 copy
        assert isinstance(q4.output, quantize.WeightOnlyInt8Linear)
        assert isinstance(q4.layers[0].feed_forward.w13, quantize.WeightOnlyInt4Linear)
        ids = torch.tensor([[1, 2, 3]])
        q4.setup_caches(1, 16)
        assert q4(ids, torch.arange(3)).isfinite().all()


def test_model_bytes_counts_what_a_step_reads():
    import torch
    import quantize
    import tiny
    from checkpoint import model_bytes
    from model import ModelArgs, Transformer
    untied = Transformer(ModelArgs.from_hf_config(tiny.tiny_config()))
    emb = untied.tok_embeddings.weight.numel() * 4
    total = sum(p.numel() * 4 for p in untied.parameters())
    assert model_bytes(untied) == total - emb and model_bytes(untied, per_step=False) == total
    tied = Transformer(ModelArgs.from_hf_config(tiny.tiny_config(tie_word_embeddings=True)))
    total = sum(p.numel() * 4 for p in tied.parameters())       # parameters() yields the tied tensor once
    assert model_bytes(tied) == model_bytes(tied, per_step=False) == total
    # quantized, the tied head is an int8 copy that a step reads whole, and the float table is only gathered
    quantize.quantize_module(tied, "int8")
    head = tied.output.weight.numel() + tied.output.scales.numel() * tied.output.scales.element_size()
    assert model_bytes(tied, per_step=False) - model_bytes(tied) == tied.tok_embeddings.weight.numel() * 4
    assert model_bytes(tied) > head
    # the multi-row copies speculative decoding adds are held but not read by a decode step
    import cpu_kernels
    tied.to(torch.bfloat16)                       # the copies are for bf16 activations
    step, held = model_bytes(tied), model_bytes(tied, per_step=False)
    packed = quantize.pack_int8_rows(tied)
    assert (packed > 0) == cpu_kernels.int8_available()
    assert model_bytes(tied) == step and (model_bytes(tied, per_step=False) > held) == (packed > 0)
