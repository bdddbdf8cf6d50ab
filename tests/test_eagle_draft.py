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
