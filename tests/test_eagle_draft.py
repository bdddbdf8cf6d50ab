"""EAGLE draft network: cache vs no-cache equivalence, draft vocabulary, checkpoint round trip, misfit errors."""
import pytest
import torch

import eagle_draft as E
from checkpoint import UserError
from model import ModelArgs, Transformer
from tiny import tiny_config


def _target(**kw):
    torch.manual_seed(0)
    cfg = tiny_config(**kw)
    return Transformer(ModelArgs.from_hf_config(cfg)).eval(), cfg


def test_cached_forward_matches_training_forward():
    t, _ = _target()
    d = E.EagleDraft(t.args).eval().bind_target(t)
    d.setup_caches(64, dtype=torch.float32)
    f, x = torch.randn(1, 12, 64), torch.randint(0, 256, (1, 12))
    ref = d(f, x)
    # the cache path, fed in two chunks, must give the same hidden states
    a = d(f[:, :5], x[:, :5], torch.arange(5))
    b = d(f[:, 5:], x[:, 5:], torch.arange(5, 12))
    torch.testing.assert_close(torch.cat([a, b], 1), ref, atol=1e-5, rtol=1e-5)


def test_draft_vocab_logits_are_target_rows():
    t, _ = _target()
    d2t = torch.randperm(256)[:40]
    d = E.EagleDraft(t.args, draft_vocab=d2t).eval().bind_target(t)
    h = torch.randn(3, 64)
    torch.testing.assert_close(d.logits(h), t.output(h)[:, d2t])
    p = d.logits(h).softmax(-1)
    pt = d.to_target_probs(p)
    assert pt.shape == (3, 256)
    torch.testing.assert_close(pt[:, d2t], p)
    assert torch.equal(d.to_target(torch.tensor([0, 39])), d2t[[0, 39]])


def test_embed_and_head_are_shared_not_saved(tmp_path):
    t, cfg = _target()
    d = E.EagleDraft(t.args, fc_bias=False).bind_target(t)
    assert d.embed is t.tok_embeddings and d.lm_head is t.output
    assert not any(k.startswith(("embed", "lm_head")) for k in d.state_dict())
    E.save_draft(d, tmp_path / "d.pth", cfg)
    d2 = E.load_draft(tmp_path / "d.pth", t, dtype=torch.float32)
    assert d2.fc.bias is None and d2.d2t is None
    f, x = torch.randn(1, 4, 64), torch.randint(0, 256, (1, 4))
    torch.testing.assert_close(d2(f, x), d(f, x))


def test_misfit_draft_is_a_user_error(tmp_path):
    t, cfg = _target()
    E.save_draft(E.EagleDraft(t.args).bind_target(t), tmp_path / "d.pth", cfg)
    other, _ = _target(hidden_size=32, intermediate_size=64)
    with pytest.raises(UserError, match="different target"):
        E.load_draft(tmp_path / "d.pth", other)
    with pytest.raises(UserError, match="not found"):
        E.load_draft(tmp_path / "missing.pth", t)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_convert_published_eagle_checkpoint(tmp_path, fmt):
    """A draft in the yuhuili/EAGLE-* layout → our format; outputs match an independent reference built
    from transformers' LlamaDecoderLayer (input layernorm replaced by identity) + fc."""
    import json

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from convert_hf_checkpoint import main as convert_main
    from tiny import write_checkpoint

    tpath, hf, cfg = write_checkpoint(tmp_path / "target.pth")
    torch.manual_seed(1)
    lc = LlamaConfig(**{**cfg, "num_hidden_layers": 1})
    lc._attn_implementation = "eager"
    layer = LlamaDecoderLayer(lc, 0).eval()
    layer.input_layernorm = torch.nn.Identity()
    with torch.no_grad():
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    fc = torch.nn.Linear(2 * cfg["hidden_size"], cfg["hidden_size"], bias=True)
    sd = {"fc.weight": fc.weight, "fc.bias": fc.bias,
          "embed_tokens.weight": hf.model.embed_tokens.weight}
    sd.update({f"layers.0.{k}": v for k, v in layer.state_dict().items()})
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    ed = tmp_path / "EAGLE-tiny"
    ed.mkdir()
    (ed / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(ed / "model.safetensors"))
    else:
        torch.save(sd, ed / "pytorch_model.bin")
    out = convert_main(["--eagle", str(ed), "--target-checkpoint", str(tpath)])

    from checkpoint import load_model
    target = load_model(tpath, "cpu", torch.float32)
    draft = E.load_draft(out, target, dtype=torch.float32)
    T = 9
    feats, toks = torch.randn(1, T, cfg["hidden_size"]), torch.randint(0, cfg["vocab_size"], (1, T))
    pos = torch.arange(T)[None]
    with torch.no_grad():
        x = fc(torch.cat([hf.model.embed_tokens(toks), feats], -1))
        cos_sin = LlamaRotaryEmbedding(lc)(x, pos)
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
        ref = layer(x, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = draft(feats, toks)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(draft.logits(got), hf.lm_head(ref), atol=1e-4, rtol=1e-4)


def test_convert_eagle_errors(tmp_path):
    from convert_hf_checkpoint import convert_eagle_checkpoint
    from tiny import write_checkpoint
    tpath, _, cfg = write_checkpoint(tmp_path / "target.pth")
    with pytest.raises(UserError, match="target-checkpoint"):
        convert_eagle_checkpoint(tmp_path, None)
    with pytest.raises(UserError, match="not an EAGLE draft directory"):
        convert_eagle_checkpoint(tmp_path / "nope", tpath)
    import json
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    torch.save({}, tmp_path / "e" / "pytorch_model.bin")
    with pytest.raises(UserError, match="different target"):
        convert_eagle_checkpoint(tmp_path / "e", tpath)


def test_unrolled_training_step_matches_decode_time_draft():
    """Training-time test: unrolled step 2, row i must be exactly what the cached draft computes at decode
    time from true features at slots 0..i plus its own step-1 guess at slot i+1."""
    t, _ = _target()
    d = E.EagleDraft(t.args).eval().bind_target(t)
    d.setup_caches(64, dtype=torch.float32)
    T = 10
    f, x = torch.randn(1, T, 64), torch.randint(0, 256, (1, T))
    kv = E.UnrolledKV()
    n = T - 1
    pos = torch.arange(n)
    p1 = d(f[:, :-1], x[:, 1:], mask=E.unrolled_mask(n, 1, "cpu"), pos=pos, kv=kv)
    x2 = torch.nn.functional.pad(x[:, 2:], (0, 1))
    p2 = d(p1, x2, mask=E.unrolled_mask(n, 2, "cpu"), pos=pos + 1, kv=kv)
    for i in (0, 3, n - 2):
        d(f[:, :i + 1], x[:, 1:i + 2], torch.arange(i + 1))          # true features in slots 0..i
        h = d(p1[:, i:i + 1], x[:, i + 2:i + 3], torch.tensor([i + 1]))
        torch.testing.assert_close(h[0, 0], p2[0, i], atol=1e-5, rtol=1e-5)
    assert d.layer.attention.kv_cache is not None and not isinstance(d.layer.attention.kv_cache, E.UnrolledKV)


def test_unrolled_loss_reduces_to_eagle1_and_trains_deeper_steps():
    t, _ = _target()
    d = E.EagleDraft(t.args).bind_target(t)
    f, x = torch.randn(2, 12, 64), torch.randint(0, 256, (2, 12))
    m = torch.ones(2, 12, dtype=torch.bool)
    l1, parts1 = E.eagle_loss(d, f, x, m)
    l1b, _ = E.eagle_loss(d, f, x, m, unroll=1)
    torch.testing.assert_close(l1, l1b)
    l3, parts3 = E.eagle_loss(d, f, x, m, unroll=3)
    assert torch.isfinite(l3) and not torch.allclose(l1, l3)
    torch.testing.assert_close(parts1["acc"], parts3["acc"])     # acc reports step 1 in both
    l3.backward()
    assert d.fc.weight.grad is not None and torch.isfinite(d.fc.weight.grad).all()
