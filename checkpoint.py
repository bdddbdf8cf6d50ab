"""Our checkpoint files: one place that reads and writes them, shared by every entry point.

It exists because DESIGN.md forbids importing generate.py, yet generate, quantize, train and benchmark
all load the same files. A checkpoint is one `torch.save`d dict, self-describing so a renamed file is
still understood:

    {"eaglet": 1, "kind": "target" | "eagle_draft",
     "config": <HF config.json dict for a target; draft config for a draft>,
     "quantization": None | {"mode": "int8"} | {"mode": "int4", "groupsize": 32} | {"mode": "int4-gptq", ...},
     "state_dict": {name: tensor}}

Writes go to a temporary file in the same directory and are renamed into place, so a crash never leaves
a half-written checkpoint under the real name.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from model import ModelArgs, Transformer

FORMAT_VERSION = 1


class UserError(Exception):
    """A mistake the user can fix. CLIs print `error: <message>` on one line and exit with code 2."""


def run_cli(main):
    """Call main(); turn UserError (and Ctrl-C) into one line on stderr + exit code 2."""
    import sys
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; the result should look like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path, kind: str = "target") -> dict:
    """Load and validate one of our checkpoint files (memory-mapped: weights are paged in lazily)."""
    path = Path(path)
    if not path.exists():
        hint = " (run `python generate.py` once to prepare the default model, or convert_hf_checkpoint.py)" \
            if kind == "target" else ""
        raise UserError(f"checkpoint not found: {path}{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, ...
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        f" (the file is corrupt or truncated; convert it again)")
    if not isinstance(ckpt, dict) or "eaglet" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{path} is not an eaglet checkpoint (convert HF weights with convert_hf_checkpoint.py)")
    if ckpt.get("kind", "target") != kind:
        raise UserError(f"{path} holds a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt


def model_args(config: dict) -> ModelArgs:
    try:
        return ModelArgs.from_hf_config(config)
    except ValueError as e:
        raise UserError(str(e))


def load_weights(module: torch.nn.Module, state_dict: dict, quant, device, dtype, mismatch: str):
    """Load a (possibly quantized) state dict into a module built on the meta device: swap in quantized
    linears, assign the tensors (no copy of the mmap'd file), move to `device`, cast float tensors to
    `dtype` (integer weights keep their storage), then pack quantized weights for the device.
    A mismatch raises UserError("<mismatch>: <first problem>")."""
    if quant:
        import quantize  # only quantized files need it
        quantize.swap_linears(module, quant)
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise UserError(f"{mismatch}: {first.strip()[:300]}")
    module = module.to(device=device)
    for _, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    if quant:
        import quantize
        quantize.prepare_for_device(module, device)
    return module


def load_model(path, device="cpu", dtype=torch.bfloat16) -> Transformer:
    """Build the Transformer described by the checkpoint and load its (possibly quantized) weights."""
    ckpt = read_checkpoint(path, "target")
    args = model_args(ckpt["config"])
    with torch.device("meta"):
        model = Transformer(args)
    quant = ckpt.get("quantization")
    sd = dict(ckpt["state_dict"])
    if args.tie_embeddings and "output.weight" not in sd and "tok_embeddings.weight" in sd:
        # the module registers the tied weight under both names, so strict loading wants both
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model = load_weights(model, sd, quant, device, dtype, f"weights in {path} do not match its config")
    if args.tie_embeddings and isinstance(model.output, torch.nn.Linear):  # a quantized head is its own copy
        model.output.weight = model.tok_embeddings.weight
    model.checkpoint_meta = {"path": str(path), "quantization": quant, "config": ckpt["config"]}
    return model.eval()


def model_bytes(model: torch.nn.Module, per_step: bool = True) -> int:
    """Bytes of weights one decode step reads (each parameter/buffer once; tied weights counted once). The
    embedding table counts only where it is also the output layer: a step gathers one row of it, while a
    quantized head (tied or not) is a copy of its own and is read whole. The multi-row copies of int8 codes
    that speculative decoding adds (quantize.WeightOnlyInt8Linear.packed) are not read by a decode step.
    per_step=False: every weight byte held (what a file or the memory holds)."""
    seen, total = set(), 0
    emb = getattr(model, "tok_embeddings", None)
    out = getattr(getattr(model, "output", None), "weight", None)
    if per_step and emb is not None and (out is None or out.data_ptr() != emb.weight.data_ptr()):
        seen.add(emb.weight.data_ptr())
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "cache" not in n
                                          and "rope" not in n and "mask" not in n
                                          and not (per_step and n.rsplit(".", 1)[-1].startswith("packed"))]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
