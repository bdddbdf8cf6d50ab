"""quantize.py: kernels vs dequantized references, file round trips, GPTQ, clear errors."""
import subprocess
import sys
import unittest.mock
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu_kernels
import quantize
from checkpoint import UserError, atomic_save, load_model, read_checkpoint
from quantize import (WeightOnlyInt4Linear, WeightOnlyInt8Linear, dequantize_int4, pack_int4, quantize_int4,
                      quantize_int8, unpack_int4)
from tiny import tiny_config, write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# int4 on CPU: our kernel (int4_cpu.cpp) where the CPU has AVX512-BF16, and aten's everywhere
INT4_BACKENDS = (["cpu"] + (["cpu-aten"] if cpu_kernels.int4_available() else [])
                 + (["cuda"] if torch.cuda.is_available() else []))
needs_int4_kernel = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                                       reason="int4_cpu.cpp is built for CPUs with AVX512-BF16 only")


def rel_err(y, ref):
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def int8_module(w, bias=None, dtype=torch.float32):
    q, s = quantize_int8(w)
    m = WeightOnlyInt8Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype)
    m.weight, m.scales = q, s.to(dtype)
    if bias is not None:
        m.bias = bias.to(dtype)
    return m, q.float() * s[:, None]


def int4_module(w, groupsize, device="cpu", dtype=torch.float32):
    """device "cpu-aten": on the CPU with aten's kernel even where ours is available."""
    q, sz = quantize_int4(w, groupsize)
    m = WeightOnlyInt4Linear(w.shape[1], w.shape[0], groupsize, dtype=dtype)
    m.weight, m.scales_and_zeros = pack_int4(q), sz.to(dtype)
    device, aten = device.split("-")[0], device.endswith("-aten")
    m.to(device)
    available = cpu_kernels.int4_available
    cpu_kernels.int4_available = (lambda: False) if aten else available
    try:
        m.prepare(device)
    finally:
        cpu_kernels.int4_available = available
    expected = {"cuda": "cuda", "cpu": "eaglet-cpu" if cpu_kernels.int4_available() and not aten else "cpu"}
    assert m.packed_for == expected[device]
    return m, dequantize_int4(q, sz, groupsize)[:, :w.shape[1]]


# ----------------------------------------------------------------------------- quantizers and layouts

def test_pack_unpack_roundtrip_and_layout():
    q = torch.randint(0, 16, (5, 12), dtype=torch.int32)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 6)
    assert torch.equal(unpack_int4(p), q)
    assert p[0, 0].item() == (q[0, 0].item() << 4) | q[0, 1].item()   # even column in the high nibble


def test_int4_rounding_error_within_half_step():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    s, z = quantize.int4_group_params(w, 32, clip_ratios=(1.0,))   # plain min/max: nothing is clipped
    q = quantize.int4_codes(w, s, z, 32)
    sz = quantize.pack_scales_and_zeros(s, z)
    assert q.min() >= 0 and q.max() <= 15
    step = sz[..., 0].float().t().repeat_interleave(32, dim=1)      # [out, in]
    err = (dequantize_int4(q, sz, 32) - w).abs()
    assert (err <= 0.5 * step + 2e-2 * step + 1e-6).all()   # bf16 rounding of scale/zero adds a little
    # the clip search only ever lowers each group's squared error
    s2, z2 = quantize.int4_group_params(w, 32, clip_ratios=quantize.CLIP_RATIOS)
    q2, sz2 = quantize.int4_codes(w, s2, z2, 32), quantize.pack_scales_and_zeros(s2, z2)
    per_group = lambda q, sz: (dequantize_int4(q, sz, 32) - w).pow(2).reshape(32, 4, 32).sum(-1)  # noqa: E731
    assert (per_group(q2, sz2) <= per_group(q, sz) + 1e-6).all()
    assert per_group(q2, sz2).sum() < 0.97 * per_group(q, sz).sum()


def test_int8_rounding_error_within_half_step():
    w = torch.randn(16, 40)
    q, s = quantize_int8(w)
    assert ((q.float() * s[:, None] - w).abs() <= 0.5 * s[:, None] + 1e-6).all()


# ----------------------------------------------------------------------------- kernels vs references

@pytest.mark.parametrize("rows", [1, 7, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_dequantized(rows, dtype):
    torch.manual_seed(0)
    w, b = torch.randn(48, 96), torch.randn(48)
    m, wd = int8_module(w, b, dtype)
    x = torch.randn(2, rows, 96).to(dtype)
    y = m(x)
    assert y.shape == (2, rows, 48) and y.dtype == dtype
    ref = x.float() @ wd.t() + b
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("device", INT4_BACKENDS)
@pytest.mark.parametrize("groupsize", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 33])
def test_int4_linear_matches_dequantized(device, groupsize, rows):
    torch.manual_seed(groupsize + rows)
    w = torch.randn(64, 512)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m, wd = int4_module(w, groupsize, device, dtype)
    x = torch.randn(1, rows, 512).to(dtype)
    y = m(x.to(m.weight.device))
    assert y.shape == (1, rows, 64)
    ref = x.float() @ wd.t()
    assert rel_err(y.cpu(), ref) < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("device", INT4_BACKENDS)
def test_int4_pads_odd_shapes(device):
    # in_features not a multiple of the group size (pad columns), out_features not a multiple of 16 (pad rows)
    torch.manual_seed(1)
    w = torch.randn(40, 96)
    m, wd = int4_module(w, 64, device, torch.bfloat16 if device == "cuda" else torch.float32)
    assert m.out_padded == 48 and m.in_padded == 128
    x = torch.randn(3, 96).to(m.scales_and_zeros.dtype)
    assert rel_err(m(x.to(m.weight.device)).cpu(), x.float() @ wd.t()) < 2e-2


@pytest.mark.parametrize("device", ["cpu", "cpu-aten"])
def test_int4_bf16_cpu(device):
    if device == "cpu-aten" and "cpu-aten" not in INT4_BACKENDS:
        pytest.skip("aten is the only CPU int4 kernel here")
    torch.manual_seed(2)
    w = torch.randn(32, 256)
    m, wd = int4_module(w, 32, device, torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert rel_err(m(x), x.float() @ wd.t()) < 2e-2


@needs_int4_kernel
def test_int4_cpu_kernel_exact_up_to_fp32_rounding_and_row_independent():
    """int4_cpu.cpp computes s * sum(x (q - 8)) + z * sum(x) per group with exact products: fp32 results match
    the dequantized float64 product to fp32 rounding (and bf16 ones to bf16's), at every row count the kernel
    tiles differently (1, 2-3, 4+, remainders), for SmolLM2's shapes and each group size. A row's result is
    bit-identical alone or with others: greedy speculative decoding in fp32 relies on the verify reproducing
    what plain decoding computes."""
    assert cpu_kernels.int4_available(), "the kernel must build on an AVX512-BF16 CPU with a compiler"
    g = torch.Generator().manual_seed(0)
    for (n, k, gs) in ((960, 576, 32), (576, 1536, 64), (48, 256, 128), (32, 512, 256), (16, 64, 32)):
        q, sz = quantize_int4(torch.randn(n, k, generator=g), gs)
        codes, psz = quantize.pack_int4_for_eaglet_cpu(q, sz)
        ref_w = dequantize_int4(q, sz.to(torch.bfloat16), gs).double()
        for rows in (1, 2, 3, 4, 5, 8, 13):
            for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
                x = torch.randn(rows, k, generator=g).to(dtype)
                y = torch.ops.eaglet.int4_mm(x, codes, psz, gs)
                assert y.dtype == dtype and y.shape == (rows, n)
                err = rel_err(y.double(), x.double() @ ref_w.t())
                assert err < tol, (n, k, gs, rows, dtype, err)
                for r in (0, rows - 1):
                    assert torch.equal(torch.ops.eaglet.int4_mm(x[r:r + 1], codes, psz, gs), y[r:r + 1])


@needs_int4_kernel
def test_int8_cpu_kernel_exact_up_to_fp32_rounding_and_row_independent():
    """int8_cpu.cpp: bf16 x times bf16 codes (exact) summed in fp32 and scaled once, so y matches the float64
    dequantized product to bf16 output rounding at every row count it tiles differently (1, 2, 3-4, 5-8, 9-16,
    more, remainders) and for output counts that are not a multiple of 16 (padded rows); a row's result is
    bit-identical alone or with others."""
    assert cpu_kernels.int8_available(), "the kernel must build on an AVX512-BF16 CPU with a compiler"
    g = torch.Generator().manual_seed(0)
    for (n, k) in ((960, 576), (576, 1536), (40, 96), (16, 2)):
        q, s = quantize_int8(torch.randn(n, k, generator=g))
        packed, ps = quantize.pack_int8_for_eaglet_cpu(q, s)
        assert packed.shape == (-(-n // 16), k // 2, 32) and ps.shape == (packed.shape[0] * 16,)
        ref_w = (q.double() * s.to(torch.bfloat16).double()[:, None])
        for rows in (1, 2, 3, 4, 5, 8, 13, 16, 17, 40):
            x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
            y = torch.ops.eaglet.int8_mm(x, packed, ps)
            assert y.dtype == torch.bfloat16 and y.shape == (rows, packed.shape[0] * 16)
            assert not y[:, n:].any()                                      # padded rows are zero
            err = rel_err(y[:, :n].double(), x.double() @ ref_w.t())
            assert err < 1e-2, (n, k, rows, err)
            for r in (0, rows - 1):
                assert torch.equal(torch.ops.eaglet.int8_mm(x[r:r + 1], packed, ps), y[r:r + 1])
    assert quantize.pack_int8_for_eaglet_cpu(torch.zeros(16, 3, dtype=torch.int8), torch.ones(16)) is None  # odd K


@needs_int4_kernel
def test_int8_module_multirow_copy():
    """pack_rows gives a bf16 module the kernel's copy: several rows run int8_mm, one row keeps aten's path
    (what plain decoding compiles), both match the dequantized product; an fp32 module gets no copy."""
    torch.manual_seed(3)
    w, b = torch.randn(40, 96), torch.randn(40)
    m, wd = int8_module(w, b, torch.bfloat16)
    model = torch.nn.Sequential(m)
    assert m.packed is None and quantize.pack_int8_rows(model) == 1 and m.packed is not None
    assert "packed" not in m.state_dict() and m.state_dict()["weight"].shape == (40, 96)   # the file layout stays
    calls = []
    real = torch.ops.eaglet.int8_mm
    with unittest.mock.patch.object(torch.ops.eaglet, "int8_mm", lambda *a: calls.append(a[0].shape) or real(*a)):
        for rows in (1, 3, 9):
            x = torch.randn(1, rows, 96).to(torch.bfloat16)
            y = m(x)
            assert y.shape == (1, rows, 40) and rel_err(y, x.float() @ wd.t() + b) < 2e-2
    assert calls == [(3, 96), (9, 96)]                                    # the one row went to aten
    m32, _ = int8_module(w, b, torch.float32)
    assert quantize.pack_int8_rows(torch.nn.Sequential(m32)) == 0 and m32.packed is None


def test_int4_unprepared_module_refuses():
    m = WeightOnlyInt4Linear(64, 32, 32)
    with pytest.raises(RuntimeError, match="prepare"):
        m(torch.randn(1, 64))


def test_bad_groupsize_is_a_user_error():
    with pytest.raises(UserError, match="groupsize"):
        WeightOnlyInt4Linear(64, 32, 48)


# ----------------------------------------------------------------------------- GPTQ

def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    k, n = 128, 64
    mix = torch.randn(k, k) / k ** 0.5 + torch.eye(k)
    x = torch.randn(2048, k) @ mix * torch.linspace(0.2, 3, k)   # correlated, uneven input scales
    w = torch.randn(n, k)
    h = 2 * x.t() @ x / len(x)
    q_rtn, sz_rtn = quantize_int4(w, 32)
    q_g, sz_g = quantize.gptq_quantize(w, h, 32, block=32)
    ref = x @ w.t()
    err_rtn = (x @ dequantize_int4(q_rtn, sz_rtn, 32).t() - ref).pow(2).mean()
    err_g = (x @ dequantize_int4(q_g, sz_g, 32).t() - ref).pow(2).mean()
    assert err_g < 0.8 * err_rtn
    q_a, sz_a = quantize.gptq_quantize(w, h, 32, act_order=True)
    err_a = (x @ dequantize_int4(q_a, sz_a, 32).t() - ref).pow(2).mean()
    assert err_a < err_rtn
    assert q_g.min() >= 0 and q_g.max() <= 15


def test_gptq_transformer_layer_by_layer(tmp_path):
    path, _, _ = write_checkpoint(tmp_path / "model.pth")
    model = load_model(path, "cpu", torch.float32)
    sd = dict(read_checkpoint(path)["state_dict"])
    samples = [torch.randint(0, 256, (32,)) for _ in range(4)]
    new_sd, record = quantize.gptq_transformer(model, sd, samples, 32, progress=False)
    assert record["mode"] == "int4-gptq" and record["groupsize"] == 32
    assert "output" in record["linears"] and len(record["linears"]) == 2 * 4 + 1
    assert new_sd["layers.0.attention.wqkv.weight"].dtype == torch.uint8
    assert new_sd["tok_embeddings.weight"].dtype == sd["tok_embeddings.weight"].dtype


# ----------------------------------------------------------------------------- files: quantize → load → run

def dequantize_into(ref: nn.Module, qpath) -> nn.Module:
    """Replace each quantized linear of a float module by its dequantized weights: what the quantized
    module must compute up to float rounding."""
    ck = torch.load(qpath, weights_only=True)
    for name in ck["quantization"]["linears"]:
        lin = ref.get_submodule(name)
        w = quantize.dequantized_weight(ck["state_dict"], name, ck["quantization"], lin.in_features)
        lin.weight = nn.Parameter(w, requires_grad=False)   # also unties a tied head, like the file
    return ref


def dequantized_reference(path, qpath):
    return dequantize_into(load_model(path, "cpu", torch.float32), qpath)


def greedy(model, prompt, n):
    model.setup_caches(1, 64)
    T = prompt.shape[1]
    logits = model(prompt, torch.arange(T))
    out = [int(logits[0, -1].argmax())]
    for i in range(n - 1):
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([T + i]))
        out.append(int(logits[0, -1].argmax()))
    return out


@torch.no_grad()
@pytest.mark.parametrize("mode,groupsize,tie,head", [("int8", None, False, "int8"), ("int4", 32, False, "int8"),
                                                     ("int4", 64, True, "int8"), ("int4", 32, True, "int4"),
                                                     ("int8", None, True, "int8")])
def test_quantize_save_load_generate(tmp_path, mode, groupsize, tie, head):
    path, _, _ = write_checkpoint(tmp_path / "model.pth", tie_word_embeddings=tie)
    qpath = quantize.quantize_checkpoint(path, mode, groupsize, progress=False, head=head)
    assert qpath.name == ("model_int8.pth" if mode == "int8" else f"model_{mode}.g{groupsize}.pth")
    ck = read_checkpoint(qpath)
    assert ck["quantization"]["mode"] == mode and ck["quantization"].get("groupsize") == groupsize
    assert quantize.has_layout(qpath, mode, head) and (mode == "int8" or not quantize.has_layout(
        qpath, mode, "int4" if head == "int8" else "int8"))
    qm = load_model(qpath, "cpu", torch.float32)
    # an int4 file keeps its head in int8 unless --head int4 (the head holds most of int4's quality loss)
    assert isinstance(qm.output, WeightOnlyInt8Linear if head == "int8" else WeightOnlyInt4Linear)
    assert isinstance(qm.layers[0].feed_forward.w2, WeightOnlyInt8Linear if mode == "int8" else WeightOnlyInt4Linear)
    assert qm.tok_embeddings.weight.dtype == torch.float32     # the gather stays float
    ref = dequantized_reference(path, qpath)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    qm.setup_caches(1, 64)
    ref.setup_caches(1, 64)
    pos = torch.arange(9)
    assert rel_err(qm(prompt, pos), ref(prompt, pos)) < 1e-4
    assert greedy(qm, prompt, 6) == greedy(ref, prompt, 6)


def test_bf16_quantized_model_runs_and_is_smaller(tmp_path):
    path, _, _ = write_checkpoint(tmp_path / "model.pth")
    from checkpoint import model_bytes
    base = load_model(path, "cpu", torch.bfloat16)
    sizes = {}
    for mode, g in (("int8", None), ("int4", 32)):
        qm = load_model(quantize.quantize_checkpoint(path, mode, g, progress=False), "cpu", torch.bfloat16)
        sizes[mode] = model_bytes(qm)
        prompt = torch.randint(0, 256, (1, 5))
        assert len(greedy(qm, prompt, 3)) == 3
    # embedding stays bf16, every linear shrinks
    assert sizes["int4"] < sizes["int8"] < model_bytes(base)


@torch.no_grad()
def test_compiled_quantized_decode_matches_eager(tmp_path):
    path, _, _ = write_checkpoint(tmp_path / "model.pth", num_hidden_layers=1)
    qm = load_model(quantize.quantize_checkpoint(path, "int4", 32, progress=False), "cpu", torch.float32)
    qm.setup_caches(1, 32)
    torch._dynamo.reset()
    step = torch.compile(qm, fullgraph=True, dynamic=False)
    tok, pos = torch.tensor([[5]]), torch.tensor([0])
    eager = qm(tok, pos)
    from torch._dynamo.utils import counters
    counters.clear()
    assert rel_err(step(tok, pos), eager) < 1e-4
    step(torch.tensor([[7]]), torch.tensor([1]))                   # a new position must not recompile
    assert counters["stats"]["unique_graphs"] == 1


def test_draft_like_module_roundtrip():
    """Any module + state dict: linears in the state dict are quantized, a shared head outside it is not."""
    from model import ModelArgs, TransformerBlock
    args = ModelArgs.from_hf_config(tiny_config())

    class Draft(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.fc = nn.Linear(2 * args.dim, args.dim, bias=True)
            self.layer = TransformerBlock(args, input_norm=False)
            self.lm_head = head                          # the target's, shared: not in the draft's file

        def forward(self, x):
            return self.lm_head(self.layer.feed_forward(self.fc(x)))

    torch.manual_seed(0)
    head = nn.Linear(args.dim, args.vocab_size, bias=False)
    draft = Draft(head)
    sd = {k: v for k, v in draft.state_dict().items() if not k.startswith("lm_head")}
    for mode, g in (("int8", None), ("int4", 32)):
        qsd, record = quantize.quantize_state_dict(draft, sd, mode, g, progress=False)
        assert "lm_head" not in record["linears"] and "fc" in record["linears"]
        with torch.device("meta"):
            fresh = Draft(nn.Linear(args.dim, args.vocab_size, bias=False))
        quantize.swap_linears(fresh, record)
        fresh.lm_head = head
        qsd_full = dict(qsd, **{f"lm_head.{k}": v for k, v in head.state_dict().items()})
        fresh.load_state_dict(qsd_full, strict=True, assign=True)
        quantize.prepare_for_device(fresh, "cpu")
        assert isinstance(fresh.lm_head, nn.Linear) and not isinstance(fresh.fc, nn.Linear)
        # reference: dequantized weights in a float copy
        ref = Draft(head)
        ref.load_state_dict(draft.state_dict())
        for name in record["linears"]:
            lin = ref.get_submodule(name)
            lin.weight = nn.Parameter(quantize.dequantized_weight(qsd, name, record, lin.in_features))
        x = torch.randn(3, 2 * args.dim)
        with torch.no_grad():
            assert rel_err(fresh(x), ref(x)) < 1e-4


@torch.no_grad()
def test_eagle_draft_checkpoint_roundtrip(tmp_path):
    eagle_draft = pytest.importorskip("eagle_draft")
    path, _, cfg = write_checkpoint(tmp_path / "model.pth")
    target = load_model(path, "cpu", torch.float32)
    torch.manual_seed(0)
    eagle_draft.save_draft(eagle_draft.EagleDraft(target.args), tmp_path / "draft.pth", cfg)
    r = run_cli("--checkpoint", tmp_path / "draft.pth", "--draft", "--mode", "int4", "--groupsize", "32")
    assert r.returncode == 0, r.stderr
    qpath = tmp_path / "draft_int4.g32.pth"
    qd = eagle_draft.load_draft(qpath, target, "cpu", torch.float32)
    assert isinstance(qd.fc, WeightOnlyInt4Linear) and isinstance(qd.layer.feed_forward.w2, WeightOnlyInt4Linear)
    ref = dequantize_into(eagle_draft.load_draft(tmp_path / "draft.pth", target, "cpu", torch.float32), qpath)
    feats, toks = torch.randn(1, 5, cfg["hidden_size"]), torch.randint(0, 256, (1, 5))
    assert rel_err(qd(feats, toks), ref(feats, toks)) < 1e-4
    assert_one_line_error(run_cli("--checkpoint", tmp_path / "draft.pth", "--draft", "--mode", "int4-gptq"),
                          "GPTQ")


# ----------------------------------------------------------------------------- clear errors

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "quantize.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def cli_in_process(capsys, *args):
    """The CLI's main under checkpoint.run_cli without a new interpreter (each costs seconds of import)."""
    from checkpoint import run_cli as wrap
    capsys.readouterr()
    try:
        wrap(lambda: quantize.main([str(a) for a in args]))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_cli_writes_file_and_rejects_bad_flags(tmp_path, capsys):
    path, _, _ = write_checkpoint(tmp_path / "model.pth")
    r = run_cli("--checkpoint", path, "--mode", "int4", "--groupsize", "64")     # the real entry point
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model_int4.g64.pth").exists()
    assert not list(tmp_path.glob(".*tmp"))                         # atomic write leaves no temp file
    assert_one_line_error(run_cli("--checkpoint", path, "--mode", "int4", "--groupsize", "48"), "groupsize")
    cli = lambda *a: cli_in_process(capsys, *a)                     # noqa: E731
    assert_one_line_error(cli("--checkpoint", path, "--mode", "int3"), "int3")
    assert_one_line_error(cli("--checkpoint", tmp_path / "nope.pth"), "not found")
    assert_one_line_error(cli("--checkpoint", path, "--eval", "--modes", "int2"), "int2")
    assert_one_line_error(cli("--checkpoint", tmp_path / "model_int4.g64.pth", "--mode", "int8"),
                          "already quantized")
    assert_one_line_error(cli("--checkpoint", path, "--mode", "int4-gptq", "--calib-file", tmp_path / "none.txt"),
                          "calib-file")
    r = cli("--checkpoint", path, "--mode", "int8", "--output", tmp_path / "renamed.pth")
    assert r.returncode == 0 and "renamed.pth" in r.stdout
    assert read_checkpoint(tmp_path / "renamed.pth")["quantization"]["mode"] == "int8"   # renamed: still known


def byte_tokenizer(directory):
    """A 256-token byte-level tokenizer.json matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(directory) / "tokenizer.json"))


def test_cli_gptq_with_calibration_file(tmp_path, capsys):
    path, _, _ = write_checkpoint(tmp_path / "model.pth")
    byte_tokenizer(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = cli_in_process(capsys, "--checkpoint", path, "--mode", "int4-gptq", "--groupsize", "64", "--calib-file",
                       calib, "--calib-samples", "4", "--calib-seq-len", "64")
    assert r.returncode == 0, r.stderr
    qpath = tmp_path / "model_int4-gptq.g64.pth"
    assert read_checkpoint(qpath)["quantization"]["mode"] == "int4-gptq"
    qm = load_model(qpath, "cpu", torch.float32)
    ref = dequantized_reference(path, qpath)
    prompt = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert greedy(qm, prompt, 4) == greedy(ref, prompt, 4)
    # too little text for the requested samples: one clear line
    assert_one_line_error(cli_in_process(capsys, "--checkpoint", path, "--mode", "int4-gptq", "--calib-file",
                                         calib, "--calib-samples", "500", "--calib-seq-len", "64"), "calib")


def test_corrupt_and_mismatched_files(tmp_path):
    path, _, _ = write_checkpoint(tmp_path / "model.pth")
    q8 = quantize.quantize_checkpoint(path, "int8", None, progress=False)
    q4 = quantize.quantize_checkpoint(path, "int4", 32, progress=False)
    # truncated file
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(q8.read_bytes()[: q8.stat().st_size // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_model(bad, "cpu")
    # int4 file relabelled int8: names/shapes differ → one clear line
    ck = torch.load(q4, weights_only=True)
    ck["quantization"] = {**ck["quantization"], "mode": "int8"}
    atomic_save(ck, tmp_path / "relabel.pth")
    with pytest.raises(UserError, match="do not match"):
        load_model(tmp_path / "relabel.pth", "cpu")
    # int4 g32 labelled g64: scales shape mismatch
    ck["quantization"] = {**ck["quantization"], "mode": "int4", "groupsize": 64}
    atomic_save(ck, tmp_path / "regroup.pth")
    with pytest.raises(UserError, match="do not match"):
        load_model(tmp_path / "regroup.pth", "cpu")
    # int8 file whose weights were replaced by floats of the same shape: dtype check
    ck = torch.load(q8, weights_only=True)
    ck["state_dict"] = {k: (v.float() if k.endswith(".weight") and v.dtype == torch.int8 else v)
                        for k, v in ck["state_dict"].items()}
    atomic_save(ck, tmp_path / "floaty.pth")
    with pytest.raises(UserError, match="does not match"):
        load_model(tmp_path / "floaty.pth", "cpu")
    # an int8 list that is not a list of layer names, or names a layer the model lacks
    for bad_list, msg in (("output", "malformed int8_linears"), (["nope"], "layers this model does not have")):
        ck4 = torch.load(q4, weights_only=True)
        ck4["quantization"] = {**ck4["quantization"], "int8_linears": bad_list}
        atomic_save(ck4, tmp_path / "badlist.pth")
        with pytest.raises(UserError, match=msg):
            load_model(tmp_path / "badlist.pth", "cpu")
    # unknown record
    ck["quantization"] = {"mode": "fp8"}
    atomic_save(ck, tmp_path / "fp8.pth")
    with pytest.raises(UserError, match="unknown quantization"):
        load_model(tmp_path / "fp8.pth", "cpu")


def test_sharegpt_reader_gives_disjoint_texts():
    a = quantize.sharegpt_texts(0, 3)
    b = quantize.sharegpt_texts(3, 2)
    assert len(a) == 3 and len(b) == 2 and not set(a) & set(b)
    assert quantize.sharegpt_texts(1, 2) == a[1:]


def test_bench_ops_table_on_tiny_shapes():
    table = quantize.bench_ops(tiny_config(num_hidden_layers=1), 32, rows=(1, 3), repeats=1)
    rows = [line for line in table.splitlines() if line.startswith("| w") or line.startswith("| output")]
    assert len(rows) == 5 * 2 and all(line.count("x |") == 2 for line in rows)
