"""convert_hf_checkpoint.py: every on-disk HF layout → model.pth → logits equal to transformers', and each
broken input → one line on stderr, exit code 2, nothing written."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoint import load_model, run_cli
from convert_hf_checkpoint import convert_hf_checkpoint, main
from tiny import hf_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    "mha-untied": tiny_config(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": tiny_config(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-llama3-rope": tiny_config(num_key_value_heads=1, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mha-odd-theta-tied": tiny_config(num_key_value_heads=4, rope_theta=12345.6, tie_word_embeddings=True),
}


def save_bin(hf, d: Path, shards: int = 1):
    """The layouts transformers < 5 wrote with safe_serialization=False (5.x only writes safetensors)."""
    hf.config.save_pretrained(d)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if shards == 1:
        torch.save(sd, d / "pytorch_model.bin")
        return
    names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i * per:(i + 1) * per]}
        torch.save(part, d / fname)
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def save_layout(hf, d: Path, layout: str):
    if layout == "safetensors":
        hf.save_pretrained(d)
    elif layout == "safetensors-sharded":
        hf.save_pretrained(d, max_shard_size="40KB")
        assert (d / "model.safetensors.index.json").exists()
    elif layout == "bin":
        save_bin(hf, d)
    elif layout == "bin-sharded":
        save_bin(hf, d, shards=5)
    return d


def logits_of(model, idx):
    model.setup_caches(idx.shape[0], 64, torch.float32)
    with torch.no_grad():
        return model(idx, torch.arange(idx.shape[1]))


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_matches_transformers(tmp_path, name, layout):
    cfg = CONFIGS[name]
    hf = hf_model(cfg)
    d = save_layout(hf, tmp_path, layout)
    out = convert_hf_checkpoint(d, progress=False)
    assert out == d / "model.pth"
    model = load_model(out, dtype=torch.float32)
    idx = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
    assert (logits_of(model, idx) - ref).abs().max().item() < 1e-4


def test_rope_scaling_reaches_the_model(tmp_path):
    """Guards the llama3 case above against passing only because scaling was silently ignored on both sides."""
    cfg = CONFIGS["gqa-llama3-rope"]
    plain = {k: v for k, v in cfg.items() if k != "rope_scaling"}
    a = load_model(convert_hf_checkpoint(save_layout(hf_model(cfg), tmp_path / "a", "safetensors"),
                                         progress=False), dtype=torch.float32)
    b = load_model(convert_hf_checkpoint(save_layout(hf_model(plain), tmp_path / "b", "safetensors"),
                                         progress=False), dtype=torch.float32)
    idx = torch.arange(40).remainder(cfg["vocab_size"])[None]
    assert (logits_of(a, idx) - logits_of(b, idx)).abs().max().item() > 1e-3


def test_kv_cache_decode_and_batching(tmp_path):
    cfg = CONFIGS["gqa-llama3-rope"]
    model = load_model(convert_hf_checkpoint(save_layout(hf_model(cfg), tmp_path, "safetensors-sharded"),
                                             progress=False), dtype=torch.float32)
    idx = torch.randint(0, cfg["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    full = logits_of(model, idx)
    # One prefill of 8 tokens, then one token at a time through the cache.
    model.setup_caches(2, 64, torch.float32)
    with torch.no_grad():
        steps = [model(idx[:, :8], torch.arange(8))]
        for t in range(8, 20):
            steps.append(model(idx[:, t:t + 1], torch.tensor([t])))
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    singles = torch.cat([logits_of(model, idx[b:b + 1]) for b in range(2)])
    assert (singles - full).abs().max().item() < 1e-5


def test_bf16_weights_stay_bf16(tmp_path):
    cfg = tiny_config()
    hf = hf_model(cfg).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    sd = torch.load(convert_hf_checkpoint(tmp_path, progress=False), weights_only=True)["state_dict"]
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    ref = hf.state_dict()
    q, k, v = (ref[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert torch.equal(sd["layers.1.attention.wqkv.weight"], torch.cat([q, k, v]))


def test_output_option_and_cli(tmp_path, capsys):
    save_layout(hf_model(tiny_config()), tmp_path / "hf", "safetensors")
    out = tmp_path / "elsewhere" / "target.pth"
    assert main(["--checkpoint-dir", str(tmp_path / "hf"), "--output", str(out)]) == out
    assert out.exists() and not (tmp_path / "hf" / "model.pth").exists()
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["eaglet"] == 1 and ckpt["kind"] == "target" and ckpt["quantization"] is None
    assert ckpt["config"]["hidden_size"] == 64


# ----------------------------------------------------------------------------------------------------
# Broken inputs


def run_main(argv, capsys):
    capsys.readouterr()  # drop what building the fixture printed (transformers' progress bars)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    # A progress bar wiped on error leaves only "\r"s before the message.
    err = capsys.readouterr().err.split("\r")[-1]
    return e.value.code, err


def assert_clean(d: Path):
    left = [p.name for p in d.iterdir() if p.name == "model.pth" or p.name.endswith(".tmp")] if d.exists() else []
    assert left == []


def test_missing_dir(tmp_path, capsys):
    code, err = run_main(["--checkpoint-dir", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("error: checkpoint directory not found") and err.count("\n") == 1


def test_unknown_architecture(tmp_path, capsys):
    save_layout(hf_model(tiny_config()), tmp_path, "safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, err = run_main(["--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 2 and "GPT2LMHeadModel" in err and err.count("\n") == 1
    assert_clean(tmp_path)


def test_missing_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    save_layout(hf_model(tiny_config()), tmp_path, "safetensors")
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    code, err = run_main(["--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 2 and "model.layers.1.self_attn.k_proj.weight" in err and err.count("\n") == 1
    assert_clean(tmp_path)


def test_missing_tensor_in_bin(tmp_path, capsys):
    hf = hf_model(tiny_config())
    save_bin(hf, tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del sd["lm_head.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    code, err = run_main(["--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 2 and "lm_head.weight" in err and err.count("\n") == 1
    assert_clean(tmp_path)


def test_wrong_shape(tmp_path, capsys):
    save_layout(hf_model(tiny_config(intermediate_size=96)), tmp_path, "safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, err = run_main(["--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert re.search(r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight .*shape \(.*96.*\).*implies \(.*128.*\)", err)
    assert_clean(tmp_path)


def test_missing_shard(tmp_path, capsys):
    save_layout(hf_model(tiny_config()), tmp_path, "safetensors-sharded")
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    code, err = run_main(["--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 2 and "missing" in err and err.count("\n") == 1
    assert_clean(tmp_path)


@pytest.mark.parametrize("layout,victim", [("safetensors", "model.safetensors"),
                                           ("bin", "pytorch_model.bin")])
def test_truncated_weights(tmp_path, capsys, layout, victim):
    save_layout(hf_model(tiny_config()), tmp_path, layout)
    f = tmp_path / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, err = run_main(["--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 2 and victim in err and "truncated" in err and err.count("\n") == 1
    assert_clean(tmp_path)


def test_cli_process_truncated_safetensors(tmp_path):
    """The real entry point: exit code 2, one line on stderr, no traceback."""
    save_layout(hf_model(tiny_config()), tmp_path, "safetensors")
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    r = subprocess.run([sys.executable, str(ROOT / "convert_hf_checkpoint.py"), "--checkpoint-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert_clean(tmp_path)
