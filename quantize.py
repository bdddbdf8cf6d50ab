"""Weight-only quantization: int8 (per output channel) and int4 (groupwise, optionally GPTQ).

Decoding one token reads every weight once, so weight bytes are the cost of a decode step: int8 halves
them, int4 quarters them. Activations stay in float; only the stored weights shrink.

    python quantize.py --checkpoint checkpoints/.../model.pth --mode int8         → model_int8.pth
    python quantize.py --checkpoint checkpoints/.../model.pth --mode int4 --groupsize 32   → model_int4.g32.pth
    python quantize.py --checkpoint checkpoints/.../model.pth --mode int4-gptq    → model_int4-gptq.g32.pth
    python quantize.py --eval --checkpoint checkpoints/.../model.pth --modes int8,int4,int4-gptq
    python quantize.py --bench --checkpoint checkpoints/.../model.pth     (kernel timings per layer shape)

What the file holds is independent of the PyTorch version and of the device (gpt-fast stored the
tinygemm-packed layout and broke when that layout changed):
    int8: <name>.weight int8 [out, in], <name>.scales [out]                 w ≈ weight * scales
    int4: <name>.weight uint8 [out, in_p/2] (two 4-bit codes per byte, even column in the high nibble),
          <name>.scales_and_zeros [in_p/groupsize, out, 2]                  w ≈ (q - 8) * scale + zero
          (in_p = in_features rounded up to the group size; the padded columns are zero and so are the
          activations they meet)
`prepare_for_device` repacks int4 at load time for the kernel of the device it runs on.

Which layers: every nn.Linear (attention, MLP, the output head). The token embedding stays float: it is
a gather of one row per token, not a matmul. A model with tied embeddings gets a quantized copy of the
embedding as its output head, so its file holds both the float embedding and the quantized head. In an
int4 file the head is int8 unless --head int4 (see HEAD_NAMES); the record's "int8_linears" lists such
layers, whose tensors are in the int8 layout.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import cpu_kernels
from checkpoint import UserError, atomic_save, read_checkpoint, run_cli

MODES = ("int8", "int4", "int4-gptq")
GROUPSIZES = (32, 64, 128, 256)
# On CPU `_weight_int8pack_mm` beats bf16 F.linear ~2x for one row but falls behind dequantize + matmul
# from ~32 rows (a speculative tree verify): on SmolLM2-135M's shapes at 32 rows the packed kernel took
# 1.4-2x the time of dequantize + matmul. `python quantize.py --bench --checkpoint ...` re-measures.
INT8_PACKED_MAX_ROWS = 16


# ---------------------------------------------------------------------------------------------------
# Quantizers: float weight → integer codes + scales. Version- and device-independent.

def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel: (q int8 [out, in], scales float32 [out]) with w ≈ q * scales."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def padded_in_features(in_features: int, groupsize: int) -> int:
    return -(-in_features // groupsize) * groupsize


# Shrinking a group's [min, max] range trades clipping of its extremes for a finer grid for the rest;
# per group, keep the ratio with the least squared weight error (GPTQ's mse option). For round-to-nearest
# it lowered weight error yet raised SmolLM2's perplexity (+6.7% vs +6.0% without): the clipped extremes
# matter more than their count suggests. So RTN uses plain min/max, GPTQ (which compensates errors on
# the columns after) uses the search.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def int4_group_params(w: Tensor, groupsize: int, scale_dtype=torch.bfloat16,
                      clip_ratios=(1.0,)) -> tuple[Tensor, Tensor]:
    """Asymmetric parameters per group of `groupsize` input columns: (scales, zeros), each [out, in/groupsize],
    rounded to `scale_dtype` (what the kernels read) and returned as float32.
    Convention of the tinygemm kernels: w ≈ (q - 8) * scale + zero, q in [0, 15]."""
    out, k = w.shape
    g = w.float().reshape(out, k // groupsize, groupsize)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    best = None
    for r in clip_ratios:
        scales = ((hi - lo) * r).clamp(min=1e-6).div(15).to(scale_dtype).float()
        zeros = (lo * r + 8 * scales).to(scale_dtype).float()
        s, z = scales[..., None], zeros[..., None]
        q = torch.round((g - (z - 8 * s)) / s).clamp(0, 15)
        err = ((q - 8) * s + z - g).pow(2).sum(dim=-1)
        if best is None:
            best, best_s, best_z = err, scales, zeros
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_s, best_z = torch.where(better, scales, best_s), torch.where(better, zeros, best_z)
    return best_s, best_z


def int4_codes(w: Tensor, scales: Tensor, zeros: Tensor, groupsize: int) -> Tensor:
    """Codes q in [0, 15] (int32 [out, in]) for given group parameters; the rounding uses the parameters
    exactly as the kernel will see them so that dequantize(q) is the nearest grid point."""
    out, k = w.shape
    g = w.float().reshape(out, k // groupsize, groupsize)
    lo = zeros[..., None] - 8 * scales[..., None]
    return torch.round((g - lo) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(out, k)


def pack_scales_and_zeros(scales: Tensor, zeros: Tensor, dtype=torch.bfloat16) -> Tensor:
    """[out, groups] scales and zeros → the kernels' [groups, out, 2]."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)


def pad_columns(w: Tensor, groupsize: int) -> Tensor:
    k = w.shape[1]
    kp = padded_in_features(k, groupsize)
    return F.pad(w, (0, kp - k)) if kp != k else w


def quantize_int4(w: Tensor, groupsize: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest groupwise int4: (codes int32 [out, in_p], scales_and_zeros bf16 [in_p/g, out, 2])."""
    w = pad_columns(w.float(), groupsize)
    scales, zeros = int4_group_params(w, groupsize)
    return int4_codes(w, scales, zeros, groupsize), pack_scales_and_zeros(scales, zeros)


def pack_int4(q: Tensor) -> Tensor:
    """int [out, k] codes in [0, 15] → uint8 [out, k/2], even column in the high nibble (file layout;
    also exactly what CUDA's `_convert_weight_to_int4pack` takes)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4 | q[:, 1::2]).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of pack_int4 → int32 [out, k]."""
    p = packed.to(torch.int32)
    return torch.stack([p >> 4, p & 0xF], dim=-1).reshape(packed.shape[0], -1)


def pack_int4_for_eaglet_cpu(q: Tensor, scales_and_zeros: Tensor) -> tuple[Tensor, Tensor]:
    """Codes int [N, K] (N a multiple of 16, K of 8) and scales_and_zeros [K/g, N, 2] → the layout of
    int4_cpu.cpp: codes uint8 [N/16, K/8, 16, 4] (lane l of block b holds row 16b+l's codes for 8 columns,
    nibbles k0 k2 k4 k6 k1 k3 k5 k7 from bit 0 up) and bf16 [K/g, N/16, 2, 16] (16 scales, then 16 zeros)."""
    n, k = q.shape
    c = q.to(torch.uint8).reshape(n // 16, 16, k // 8, 8).permute(0, 2, 1, 3)
    codes = torch.stack([c[..., 0] | c[..., 2] << 4, c[..., 4] | c[..., 6] << 4,
                         c[..., 1] | c[..., 3] << 4, c[..., 5] | c[..., 7] << 4], dim=-1).contiguous()
    g = scales_and_zeros.shape[0]
    sz = scales_and_zeros.reshape(g, n // 16, 16, 2).permute(0, 1, 3, 2).to(torch.bfloat16).contiguous()
    return codes, sz


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor, groupsize: int) -> Tensor:
    """float32 [out, k] reference dequantization (tests, GPTQ, eval)."""
    out, k = q.shape
    sz = scales_and_zeros.float()
    s, z = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]
    return ((q.reshape(out, k // groupsize, groupsize).float() - 8) * s + z).reshape(out, k)


def dequantized_weight(state_dict: dict, name: str, record: dict, in_features: int) -> Tensor:
    """float32 [out, in] weight that the quantized tensors of linear `name` in a file's state dict stand for."""
    if record["mode"] == "int8" or name in record.get("int8_linears", []):
        return state_dict[f"{name}.weight"].float() * state_dict[f"{name}.scales"].float()[:, None]
    q = unpack_int4(state_dict[f"{name}.weight"])
    return dequantize_int4(q, state_dict[f"{name}.scales_and_zeros"], record["groupsize"])[:, :in_features]


def check_groupsize(groupsize: int) -> None:
    if groupsize not in GROUPSIZES:
        raise UserError(f"--groupsize {groupsize} is not supported; use one of {', '.join(map(str, GROUPSIZES))}")


# ---------------------------------------------------------------------------------------------------
# Modules

def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [..., in] @ (weight int8 [out, in] * scales [out]).T, in x's dtype, on the device's fast path."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.shape[1])
    scales = scales.to(x.dtype)
    # Row count is static per compiled graph, so this branch is decided at trace time (no recompiles).
    if x2.device.type == "cpu" and x2.shape[0] <= INT8_PACKED_MAX_ROWS:
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), weight, scales)
    else:
        # CUDA: Inductor fuses the int8→float cast into the matmul's load; CPU, many rows: a plain GEMM
        # on the dequantized weight is faster than the packed kernel.
        y = F.linear(x2, weight.to(x.dtype)) * scales
    return y.reshape(*lead, weight.shape[0])


def pack_int8_for_eaglet_cpu(q: Tensor, scales: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """int8 codes [N, K] and scales [N] → the layout of int8_cpu.cpp: codes [N/16, K/2, 32] (bytes 2l, 2l+1
    of block b and pair j are row 16b+l's columns 2j, 2j+1) and bf16 scales [N], N padded to a multiple of
    16 with zero rows. None where that kernel does not run (no AVX512-BF16, not on a CPU) or K is odd."""
    n, k = q.shape
    if k % 2 or q.device.type != "cpu" or not cpu_kernels.int8_available():
        return None
    n_pad = -(-n // 16) * 16
    if n_pad != n:
        q, scales = F.pad(q, (0, 0, 0, n_pad - n)), F.pad(scales, (0, n_pad - n))
    packed = q.reshape(n_pad // 16, 16, k // 2, 2).permute(0, 2, 1, 3).reshape(n_pad // 16, k // 2, 32)
    return packed.contiguous(), scales.to(torch.bfloat16).contiguous()


class WeightOnlyInt8Linear(nn.Module):
    """y = x @ (q * scales).T + bias with q int8 per output channel; scales in the activation dtype.

    On a CPU, one row of x (a decode step) runs aten's `_weight_int8pack_mm`, which Inductor's int8 GEMM
    template replaces in compiled graphs. Several rows (a tree verify) run eaglet's `int8_mm` (int8_cpu.cpp) where
    `pack_rows` has given the module a copy of the codes in that kernel's layout: speculative decoding asks
    for it (pack_int8_rows), plain decoding does not pay the memory.

    Why two kernels: the template computes in fp32 FMAs, one per weight and row, so its cost grows with the
    rows; int8_mm takes two steps of k per vdpbf16ps. In the compiled SmolLM2 int8 forward over n tree tokens
    (AMD EPYC, 2 cores, 2026-12-07, one process, medians of 20 interleaved calls) the template took 7.6 / 10.9
    / 18.5 / 31.1 ms at n = 1 / 4 / 8 / 16 and int8_mm (from 2 rows) 7.7 / 11.4 / 13.5 / 23.3. At one row
    int8_mm alone is as fast as the template (121 matmuls: 6.4 against 6.3 ms), but the whole forward on it
    was 10-13% slower (11.1 against 10.0 ms, 9.0 against 8.0 in another run) for reasons not found, so decode
    steps keep the template and its [N, K] codes, and the packed copy (as many bytes again) exists only where
    a verify uses it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.bfloat16,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("packed", None, persistent=False)          # set by pack_rows
        self.register_buffer("packed_scales", None, persistent=False)

    def pack_rows(self) -> bool:
        """Add the int8_cpu.cpp copy of the codes where that kernel runs: bf16 activations (the scales'
        dtype, which loading casts to the model's) on a CPU with AVX512-BF16. True when it is there."""
        if self.packed is None and self.scales.dtype == torch.bfloat16:
            packed = pack_int8_for_eaglet_cpu(self.weight, self.scales)
            if packed is not None:
                self.packed, self.packed_scales = packed
        return self.packed is not None

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        rows = math.prod(lead)
        if self.packed is not None and rows >= 2 and x.dtype == torch.bfloat16:   # static per compiled graph
            y = torch.ops.eaglet.int8_mm(x.reshape(rows, self.in_features), self.packed, self.packed_scales)
            y = y[:, :self.out_features].reshape(*lead, self.out_features)
        else:
            y = int8_matmul(x, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class WeightOnlyInt4Linear(nn.Module):
    """Groupwise asymmetric int4. Holds the file layout until `prepare(device)` repacks it for the device's
    kernel: on CPUs with AVX512-BF16 our `eaglet::int4_mm` (int4_cpu.cpp, via cpu_kernels), on other CPUs
    aten's `_weight_int4pack_mm_for_cpu`, on CUDA `_weight_int4pack_mm` (tinygemm)."""

    def __init__(self, in_features: int, out_features: int, groupsize: int, bias: bool = False,
                 dtype=torch.bfloat16, device=None):
        super().__init__()
        check_groupsize(groupsize)
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        self.in_padded = padded_in_features(in_features, groupsize)
        self.register_buffer("weight", torch.empty(out_features, self.in_padded // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales_and_zeros", torch.empty(self.in_padded // groupsize, out_features, 2,
                                                             dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.packed_for: Optional[str] = None   # None: file layout; "cpu" / "cuda": the kernel's layout
        self.out_padded = out_features

    def prepare(self, device) -> None:
        """File layout → the packed layout of `device`'s kernel (which depends on the PyTorch version)."""
        kind = torch.device(device).type
        if self.packed_for == kind or (self.packed_for == "eaglet-cpu" and kind == "cpu"):
            return
        if self.packed_for is not None:
            raise RuntimeError("WeightOnlyInt4Linear is already packed for another device; reload the file")
        q = unpack_int4(self.weight.to(device))
        sz = self.scales_and_zeros.to(device)
        # Kernels tile output rows by 16 (CPU) / 8 (CUDA); pad with zero rows and slice them off after.
        multiple = 16 if kind == "cpu" else 8
        n_pad = -(-self.out_features // multiple) * multiple
        if n_pad != self.out_features:
            q = F.pad(q, (0, 0, 0, n_pad - self.out_features), value=8)
            sz = F.pad(sz, (0, 0, 0, n_pad - self.out_features))
        if kind == "cpu" and cpu_kernels.int4_available():
            packed, sz = pack_int4_for_eaglet_cpu(q, sz)
            kind = "eaglet-cpu"
        elif kind == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        elif kind == "cuda":
            # tinygemm wants in_features % (inner_k_tiles * 16) == 0; 8 tiles is the fast case.
            tiles = next(t for t in (8, 4, 2) if self.in_padded % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(pack_int4(q), tiles)
            sz = sz.to(torch.bfloat16)  # tinygemm computes in bf16
        else:
            raise UserError(f"int4 weights run on cpu or cuda, not {kind}")
        self.weight = packed
        self.scales_and_zeros = sz.contiguous()
        self.out_padded, self.packed_for = n_pad, kind

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.in_padded != self.in_features:
            x2 = F.pad(x2, (0, self.in_padded - self.in_features))
        if self.packed_for == "eaglet-cpu":
            y = torch.ops.eaglet.int4_mm(x2 if x2.dtype != torch.float16 else x2.float(), self.weight,
                                         self.scales_and_zeros, self.groupsize).to(x.dtype)
        elif self.packed_for == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight, self.groupsize,
                                                           self.scales_and_zeros.to(x.dtype))
        elif self.packed_for == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight,
                                                   self.groupsize, self.scales_and_zeros).to(x.dtype)
        else:
            raise RuntimeError("WeightOnlyInt4Linear used before prepare(device) (load via checkpoint.load_model "
                               "or call quantize.prepare_for_device)")
        if self.out_padded != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, groupsize={self.groupsize}"


# ---------------------------------------------------------------------------------------------------
# Hooks used by checkpoint.load_model (and the draft loader)

def check_record(quant) -> tuple[str, Optional[int]]:
    """Validate a checkpoint's "quantization" record → (mode, groupsize or None)."""
    if not isinstance(quant, dict) or quant.get("mode") not in MODES:
        raise UserError(f"unknown quantization record {quant!r} in the checkpoint (expected mode one of "
                        f"{', '.join(MODES)}); quantize the float checkpoint again")
    mode = quant["mode"]
    keep = quant.get("int8_linears", [])
    if not isinstance(keep, list) or not all(isinstance(n, str) for n in keep):
        raise UserError(f"quantization record {quant!r} has a malformed int8_linears list; quantize again")
    if mode == "int8":
        return mode, None
    g = quant.get("groupsize")
    if g not in GROUPSIZES:
        raise UserError(f"quantization record {quant!r} has an unsupported groupsize; quantize again")
    return mode, g


def _linear_names(module: nn.Module, names: Optional[Iterable[str]] = None) -> list[str]:
    found = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if names is None:
        return found
    names = list(names)
    missing = sorted(set(names) - set(found))
    if missing:
        raise UserError(f"the checkpoint's quantization record names layers this model does not have: "
                        f"{', '.join(missing[:4])}")
    return names


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def swap_linears(model: nn.Module, quant: dict) -> nn.Module:
    """Replace the nn.Linear layers named in the record (all of them when it names none) by empty quantized
    modules, ready for `load_state_dict(..., assign=True)`. Works on a meta-device model."""
    mode, groupsize = check_record(quant)
    int8 = set(_linear_names(model, quant.get("int8_linears", [])))
    for name in _linear_names(model, quant.get("linears")):
        lin = model.get_submodule(name)
        kw = dict(bias=lin.bias is not None, device=lin.weight.device)
        new = (WeightOnlyInt8Linear(lin.in_features, lin.out_features, **kw) if mode == "int8" or name in int8 else
               WeightOnlyInt4Linear(lin.in_features, lin.out_features, groupsize, **kw))
        _set_submodule(model, name, new)
    return model


def _check_contents(model: nn.Module) -> None:
    """load_state_dict(assign=True) checks names and shapes but not dtypes: a float file labelled int8, or
    an int4 file labelled int8, must fail here with one line rather than deep inside a kernel."""
    for name, m in model.named_modules():
        if isinstance(m, WeightOnlyInt8Linear):
            want = {"weight": torch.int8}
        elif isinstance(m, WeightOnlyInt4Linear) and m.packed_for is None:
            want = {"weight": torch.uint8}
        else:
            continue
        for attr, dt in want.items():
            t = getattr(m, attr)
            if t.dtype != dt:
                kind = "int8" if dt == torch.int8 else "int4"
                raise UserError(f"{name}.{attr} is {t.dtype}, not {dt}: the checkpoint's recorded quantization "
                                f"({kind}) does not match its weights; quantize the float checkpoint again")
        scales = m.scales if isinstance(m, WeightOnlyInt8Linear) else m.scales_and_zeros
        if not scales.is_floating_point():
            raise UserError(f"{name} has integer scales: the checkpoint's recorded quantization does not match "
                            f"its weights; quantize the float checkpoint again")


def pack_int8_rows(model: nn.Module) -> int:
    """Give every WeightOnlyInt8Linear of `model` its multi-row copy (WeightOnlyInt8Linear.pack_rows) where the
    kernel runs; returns how many have one. Speculative decoding calls this for its target and draft."""
    return sum(m.pack_rows() for m in model.modules() if isinstance(m, WeightOnlyInt8Linear))


def prepare_for_device(model: nn.Module, device) -> nn.Module:
    """After the quantized weights are loaded and moved to `device`: validate them and pack int4 for the
    device's kernel."""
    _check_contents(model)
    for m in model.modules():
        if isinstance(m, WeightOnlyInt4Linear):
            m.prepare(device)
    return model


# ---------------------------------------------------------------------------------------------------
# Quantizing a state dict

def quantize_linear_weight(w: Tensor, mode: str, groupsize: Optional[int], hessian: Optional[Tensor] = None,
                           **gptq_kw) -> dict:
    """One linear's float weight → the tensors the file stores for it (without the name prefix)."""
    if mode == "int8":
        q, s = quantize_int8(w)
        return {"weight": q, "scales": s.to(torch.bfloat16)}
    if mode == "int4-gptq":
        if hessian is None:
            raise ValueError("GPTQ needs the layer's Hessian")
        q, sz = gptq_quantize(w, hessian, groupsize, **gptq_kw)
    else:
        q, sz = quantize_int4(w, groupsize)
    return {"weight": pack_int4(q), "scales_and_zeros": sz}


def quantize_state_dict(module: nn.Module, state_dict: dict, mode: str, groupsize: Optional[int] = None,
                        hessians: Optional[dict] = None, progress: bool = True, done: Optional[dict] = None,
                        int8_linears: Iterable[str] = (), **gptq_kw) -> tuple[dict, dict]:
    """Quantize every nn.Linear of `module` whose weight is in `state_dict` (generic: a target Transformer, an
    EAGLE draft, anything). Linears whose weight the state dict does not hold (e.g. a draft's lm_head shared
    with the target) are left alone. Tied weights (one tensor under two names) get a quantized copy for the
    linear and keep the float tensor for the other user. `done` maps linear names to tensors already
    quantized (GPTQ's sweep); `int8_linears` are quantized to int8 whatever `mode` is (an int4 model's
    head). Returns (new_state_dict, quantization record)."""
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; use one of {', '.join(MODES)}")
    if mode != "int8":
        check_groupsize(groupsize)
    names = [n for n in _linear_names(module) if f"{n}.weight" in state_dict]
    if not names:
        raise UserError("found no linear layer weights to quantize in this checkpoint")
    keep = set(int8_linears)
    int8 = [n for n in names if n in keep] if mode != "int8" else []
    out = dict(state_dict)
    from tqdm import tqdm
    for name in tqdm(names, desc=f"quantize {mode}", disable=not progress, unit="layer"):
        w = state_dict[f"{name}.weight"]
        if w.dim() != 2:
            raise UserError(f"{name}.weight has shape {tuple(w.shape)}, expected a 2-D linear weight")
        h = hessians.get(name) if hessians else None
        del out[f"{name}.weight"]
        tensors = quantize_linear_weight(w, "int8", None) if name in int8 else \
            (done or {}).get(name) or quantize_linear_weight(w, mode, groupsize, h, **gptq_kw)
        for k, v in tensors.items():
            out[f"{name}.{k}"] = v
    record = {"mode": mode, "linears": names}
    if mode != "int8":
        record["groupsize"] = groupsize
    if int8:
        record["int8_linears"] = int8
    return out, record


# The head of an int4 model stays int8 unless --head int4: on SmolLM2-135M (bf16, 8 x 512 held-out ShareGPT
# tokens) an all-int4 RTN g32 model lost 6.0% perplexity and the same model with an int8 head 0.13% (int8 for
# w2 or for attention instead: 5.6%, 6.3%), for 10 MiB more weights (+8%). llama.cpp's Q4_1 file of
# this model does the same: its (tied) token_embd is Q8_0.
HEAD_NAMES = ("output",)


def has_layout(path: Path, mode: str, head: str = "int8") -> bool:
    """Whether an existing quantized file holds what `quantize_checkpoint(..., mode, head=head)` writes now
    (files made before the int8 head have none): --eval and the benchmark reuse only such files."""
    try:
        quant = read_checkpoint(path).get("quantization") or {}
    except UserError:
        return False
    return quant.get("mode") == mode and quant.get("int8_linears", []) == int8_linears_for(mode, head)


def int8_linears_for(mode: str, head: str) -> list[str]:
    """The linears an int4 file keeps in int8, for --head int8 (default) or int4."""
    if head not in ("int8", "int4"):
        raise UserError(f"--head must be int8 or int4, got {head!r}")
    return list(HEAD_NAMES) if mode != "int8" and head == "int8" else []


def quantize_module(module: nn.Module, mode: str = "int8", groupsize: Optional[int] = None,
                    int8_linears: Iterable[str] = ()) -> nn.Module:
    """Quantize a loaded float module's linears in memory, in place (an EAGLE draft at load time: its
    precision only changes what it proposes, never what the target accepts; the benchmark's random-weight
    models). int8_linears: as quantize_state_dict's (an int4 model's head)."""
    device = next(module.parameters()).device
    sd = dict(module.state_dict())
    new_sd, record = quantize_state_dict(module, sd, mode, groupsize, progress=False, int8_linears=int8_linears)
    swap_linears(module, record)
    module.load_state_dict({k: v.to(device) for k, v in new_sd.items()}, strict=True, assign=True)
    prepare_for_device(module, device)
    module.quantization = record
    return module


# ---------------------------------------------------------------------------------------------------
# GPTQ (Frantar et al. 2022): quantize columns left to right, pushing each column's rounding error onto
# the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = 2 XᵀX).

def gptq_quantize(w: Tensor, hessian: Tensor, groupsize: int, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, clip_ratios=CLIP_RATIOS) -> tuple[Tensor, Tensor]:
    """→ (codes int32 [out, in_p], scales_and_zeros bf16), the same format as quantize_int4."""
    W = pad_columns(w.float(), groupsize).clone()
    out, k = W.shape
    H = torch.zeros(k, k, dtype=torch.float32)
    H[:hessian.shape[0], :hessian.shape[1]] = hessian.float()
    dead = torch.diag(H) == 0          # inputs that never fire (and padding): nothing to compensate
    H[dead, dead] = 1
    W[:, dead] = 0
    # In natural order each group's parameters are chosen when the sweep reaches it, from the weights as
    # updated so far (as in the paper). Act-order visits columns out of order, so its group parameters are
    # fixed up front from the original weights ("static groups") and each column keeps its own group.
    scales, zeros = int4_group_params(W, groupsize, clip_ratios=clip_ratios)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:
        raise UserError("GPTQ: the calibration Hessian is not positive definite even after damping; use more "
                        "--calib-samples or a larger --damp")
    group_of = perm // groupsize
    Q = torch.zeros_like(W, dtype=torch.int32)
    # The column loop is thousands of tiny ops: intra-op threads only add synchronisation (30x slower
    # measured on a busy 2-core machine), so it runs single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _gptq_columns(W, Hinv, Q, scales, zeros, group_of, max(block, groupsize),
                      groupsize if not act_order else None, clip_ratios)
    finally:
        torch.set_num_threads(threads)
    inv = torch.argsort(perm)
    return Q[:, inv].contiguous(), pack_scales_and_zeros(scales, zeros)


def _gptq_columns(W, Hinv, Q, scales, zeros, group_of, block, dynamic_groupsize, clip) -> None:
    k = W.shape[1]
    for i1 in range(0, k, block):    # block is a multiple of the group size: a group never straddles blocks
        i2 = min(i1 + block, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col, d = W1[:, i], Hinv1[i, i]
            g = group_of[i1 + i]
            if dynamic_groupsize and (i1 + i) % dynamic_groupsize == 0:
                s, z = int4_group_params(W1[:, i:i + dynamic_groupsize], dynamic_groupsize, clip_ratios=clip)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, g], zeros[:, g]
            q = torch.round((col - (z - 8 * s)) / s).clamp(0, 15)
            Q[:, i1 + i] = q.to(torch.int32)
            err = (col - ((q - 8) * s + z)) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        # lazy batch update: the rest of the matrix sees this block's errors in one matmul
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]


class HessianCollector:
    """Forward pre-hooks accumulating H = 2/n Σ xᵀx of each named linear's input (one [in, in] matrix per
    linear: memory is per layer, not per token). Each sample's product is a float32 GEMM (float64 GEMMs
    made calibration several times slower); the running sum over samples is kept in float64."""

    def __init__(self, module: nn.Module, names: Iterable[str]):
        self.h, self.n, self.handles = {}, {}, []
        for name in names:
            lin = module.get_submodule(name)
            self.h[name] = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float64)
            self.n[name] = 0
            self.handles.append(lin.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.h[name] += (x.t() @ x).double()
            self.n[name] += x.shape[0]
        return hook

    def result(self) -> dict:
        for h in self.handles:
            h.remove()
        return {k: (2 * v / max(self.n[k], 1)).float() for k, v in self.h.items()}


@torch.no_grad()
def gptq_transformer(model, state_dict: dict, samples: list[Tensor], groupsize: int, progress=True,
                     int8_linears: Iterable[str] = (), **gptq_kw) -> tuple[dict, dict]:
    """Layer-by-layer GPTQ of a Transformer: run the calibration batch through one block at a time (inputs of
    block i are the outputs of the already-quantized blocks < i), collect each linear's Hessian, quantize
    the block's linears and put their dequantized weights back before moving on. Only one block's
    activations live at once. Returns (quantized state dict, record)."""
    from tqdm import tqdm
    x = torch.stack([model.tok_embeddings(s) for s in samples])          # [N, T, D]
    T = x.shape[1]
    cos, sin = (t[:T][None, None] for t in _rope(model, T))
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
    pos = torch.arange(T)
    hessians, done = {}, {}
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    for prefix, layer in tqdm(blocks, desc="GPTQ", disable=not progress, unit="block"):
        names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        col = HessianCollector(layer, names)
        for j in range(len(x)):
            layer(x[j:j + 1], cos, sin, mask, pos)
        hs = col.result()
        for n in names:
            lin = layer.get_submodule(n)
            full = f"{prefix}.{n}"
            q, sz = gptq_quantize(lin.weight, hs[n], groupsize, **gptq_kw)
            done[full] = {"weight": pack_int4(q), "scales_and_zeros": sz}
            # later blocks must see this block's quantized outputs (assign: never write into the mmap'd file)
            lin.weight = nn.Parameter(dequantize_int4(q, sz, groupsize)[:, :lin.in_features], requires_grad=False)
        for j in range(len(x)):
            x[j:j + 1] = layer(x[j:j + 1], cos, sin, mask, pos)
    # the head's input is the final norm's output; its Hessian needs no [tokens, vocab] logits
    h = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
    for j in range(len(x)):
        f = model.norm(x[j]).float()
        h += (f.t() @ f).double()
    hessians["output"] = (2 * h / (x.shape[0] * x.shape[1])).float()
    return quantize_state_dict(model, state_dict, "int4-gptq", groupsize, hessians, progress, done,
                               int8_linears, **gptq_kw)


def _rope(model, T):
    from model import rope_cache
    return rope_cache(model.args, T)


# ---------------------------------------------------------------------------------------------------
# Text for calibration and evaluation (local only)

def sharegpt_texts(start: int, count: int, min_chars: int = 200) -> list[str]:
    """Conversation turns from the local ShareGPT dump, records [start, start+count) of those long enough.
    The file is a (possibly truncated) JSON array: read it record by record with raw_decode, so a cut-off
    tail costs nothing and we never parse more than we use."""
    import assets
    path = assets.fetch("sharegpt")
    dec = json.JSONDecoder()
    texts, seen = [], 0
    with open(path, encoding="utf-8") as f:
        buf, i = f.read(1 << 20), 0
        i = buf.index("[") + 1
        while len(texts) < count:
            while True:
                while i < len(buf) and buf[i] in " \n\r\t,":
                    i += 1
                try:
                    rec, j = dec.raw_decode(buf, i)
                    break
                except json.JSONDecodeError:
                    more = f.read(1 << 20)
                    if not more:
                        return texts
                    buf, i = buf[i:] + more, 0
            i = j
            turns = (rec.get("conversations") or []) if isinstance(rec, dict) else []
            text = "\n\n".join(t.get("value", "") for t in turns if isinstance(t, dict))
            if len(text) < min_chars:
                continue
            if seen >= start:
                texts.append(text)
            seen += 1
    return texts


def _encoder(ckpt_path: Path):
    d = Path(ckpt_path).parent
    try:
        from tokenizer import load_tokenizer
        tok = load_tokenizer(d)
        return lambda s: list(tok.encode(s, bos=False))
    except ImportError:
        pass
    if not (d / "tokenizer.json").exists():
        raise UserError(f"no tokenizer next to {ckpt_path} (expected {d / 'tokenizer.json'})")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return lambda s: tok.encode(s, add_special_tokens=False).ids


def token_chunks(texts: list[str], encode, n: int, seq_len: int) -> list[Tensor]:
    """`n` chunks of exactly `seq_len` tokens from consecutive texts."""
    ids, out = [], []
    for t in texts:
        ids.extend(encode(t))
        while len(ids) >= seq_len and len(out) < n:
            out.append(torch.tensor(ids[:seq_len]))
            ids = ids[seq_len:]
        if len(out) == n:
            break
    return out


def calibration_chunks(ckpt_path: Path, n: int, seq_len: int, calib_file: Optional[Path]) -> list[Tensor]:
    if calib_file is not None and not Path(calib_file).is_file():
        raise UserError(f"--calib-file {calib_file} does not exist")
    encode = _encoder(ckpt_path)
    if calib_file is not None:
        texts = [Path(calib_file).read_text(encoding="utf-8", errors="replace")]
    else:
        texts = sharegpt_texts(0, max(4 * n, 64))
    chunks = token_chunks(texts, encode, n, seq_len)
    if len(chunks) < n:
        raise UserError(f"calibration text gives only {len(chunks)} chunks of {seq_len} tokens, need "
                        f"--calib-samples {n}; use a longer --calib-file or fewer samples")
    return chunks


# Eval text starts far past the calibration records, so calibration never sees it.
EVAL_FIRST_RECORD = 5000


# ---------------------------------------------------------------------------------------------------
# Quality report

@torch.no_grad()
def _score(model, chunks: list[Tensor]) -> tuple[float, Tensor]:
    """(mean next-token NLL, greedy argmax per position) over the chunks, teacher-forced."""
    T = chunks[0].numel()
    model.setup_caches(1, T)
    pos = torch.arange(T)
    nll, argmax = 0.0, []
    for c in chunks:
        logits = model(c[None], pos)[0].float()
        nll += F.cross_entropy(logits[:-1], c[1:], reduction="sum").item()
        argmax.append(logits.argmax(-1))
    return nll / (len(chunks) * (T - 1)), torch.cat(argmax)


def evaluate(ckpt_path: Path, modes: list[str], groupsize: int, n_tokens: int, seq_len: int, dtype, a) -> str:
    """Perplexity on held-out ShareGPT text (records disjoint from calibration) and teacher-forced greedy
    agreement with the float model, per mode. Uses model_<mode>... next to the checkpoint when present,
    writing it first otherwise."""
    from checkpoint import load_model, model_bytes
    from tqdm import tqdm
    ckpt = read_checkpoint(ckpt_path)
    if ckpt.get("quantization"):
        raise UserError(f"--eval compares against the float model: pass the float checkpoint, not {ckpt_path}")
    del ckpt
    n_chunks = max(1, n_tokens // seq_len)
    chunks = token_chunks(sharegpt_texts(EVAL_FIRST_RECORD, 8 * n_chunks + 16), _encoder(ckpt_path), n_chunks,
                          seq_len)
    if not chunks:
        raise UserError("no held-out evaluation text available")
    rows = []
    base = load_model(ckpt_path, "cpu", dtype)
    base_nll, base_top = _score(base, chunks)
    rows.append(("float", model_bytes(base, per_step=False), base_nll, None))
    del base
    for mode in tqdm(modes, desc="eval", unit="mode"):
        g = None if mode == "int8" else groupsize
        path = output_path(Path(ckpt_path), mode, g)
        if not has_layout(path, mode, a.head):
            quantize_checkpoint(ckpt_path, mode, g, path, calib_file=a.calib_file, calib_samples=a.calib_samples,
                                calib_seq_len=a.calib_seq_len, act_order=a.act_order, damp=a.damp, head=a.head)
        m = load_model(path, "cpu", dtype)
        nll, top = _score(m, chunks)
        rows.append((path.name, model_bytes(m, per_step=False), nll, (top == base_top).float().mean().item()))
        del m
    n = len(chunks) * (seq_len - 1)
    lines = [f"held-out: {len(chunks)} x {seq_len} tokens of ShareGPT (records from #{EVAL_FIRST_RECORD}), "
             f"{str(dtype).replace('torch.', '')} activations, CPU",
             f"| model | weights MiB | perplexity | Δ ppl | greedy agreement |",
             f"|---|---:|---:|---:|---:|"]
    for name, nbytes, nll, agree in rows:
        ppl = math.exp(nll)
        d = "" if agree is None else f"{100 * (ppl / math.exp(base_nll) - 1):+.2f}%"
        ag = "100%" if agree is None else f"{100 * agree:.2f}%"
        lines.append(f"| {name} | {nbytes / 2**20:.1f} | {ppl:.3f} | {d} | {ag} |")
    lines.append(f"(greedy agreement: teacher-forced argmax equal to the float model's over {n + len(chunks)} "
                 f"positions)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Kernel microbenchmark

@torch.no_grad()
def bench_ops(config: dict, groupsize: int, rows=(1, 32), compile: bool = False, repeats: int = 3) -> str:
    """Time one linear per shape of the model (bf16 F.linear vs int8 vs int4 modules), µs per call. Each
    shape has one copy per layer and the timing walks through them, so weights come from memory as in a
    decode step rather than from cache."""
    import time
    from checkpoint import model_args
    a = model_args(config)
    qkv = (a.n_head + 2 * a.n_local_heads) * a.head_dim
    shapes = {"wqkv": (qkv, a.dim), "wo": (a.dim, a.n_head * a.head_dim), "w13": (2 * a.intermediate_size, a.dim),
              "w2": (a.dim, a.intermediate_size), "output": (a.vocab_size, a.dim)}
    lines = [f"µs per call, bf16 activations, {torch.get_num_threads()} threads"
             f"{', torch.compile' if compile else ''}; int4 groupsize {groupsize}",
             "| layer | out x in | rows | bf16 | int8 | int4 | int8 speedup | int4 speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, (n, k) in shapes.items():
        copies = 1 if name == "output" else a.n_layer
        mods = {"bf16": [], "int8": [], "int4": []}
        for _ in range(copies):
            w = torch.randn(n, k) / math.sqrt(k)
            lin = nn.Linear(k, n, bias=False).to(torch.bfloat16)
            lin.weight.data = w.to(torch.bfloat16)
            q8, s8 = quantize_int8(w)
            m8 = WeightOnlyInt8Linear(k, n)
            m8.weight, m8.scales = q8, s8.to(torch.bfloat16)
            q4, sz = quantize_int4(w, groupsize)
            m4 = WeightOnlyInt4Linear(k, n, groupsize)
            m4.weight, m4.scales_and_zeros = pack_int4(q4), sz
            m4.prepare("cpu")
            for key, m in (("bf16", lin), ("int8", m8), ("int4", m4)):
                mods[key].append(torch.compile(m, fullgraph=True, dynamic=False) if compile else m)
        for m_rows in rows:
            x = torch.randn(m_rows, k, dtype=torch.bfloat16)
            t = {}
            for key, ms in mods.items():
                for m in ms[:2]:
                    m(x)
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for m in ms:
                        m(x)
                    best = min(best, (time.perf_counter() - t0) / len(ms))
                t[key] = best * 1e6
            lines.append(f"| {name} | {n} x {k} | {m_rows} | {t['bf16']:.0f} | {t['int8']:.0f} | {t['int4']:.0f} | "
                         f"{t['bf16'] / t['int8']:.2f}x | {t['bf16'] / t['int4']:.2f}x |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI

def output_path(ckpt: Path, mode: str, groupsize: Optional[int]) -> Path:
    stem = ckpt.stem
    for m in MODES:  # quantizing model_int8.pth again is refused elsewhere; keep the base name clean
        stem = stem.split(f"_{m}")[0]
    suffix = f"_{mode}.pth" if mode == "int8" else f"_{mode}.g{groupsize}.pth"
    return ckpt.with_name(stem + suffix)


def draft_module(ckpt: dict) -> nn.Module:
    """The (meta-device) draft network a draft checkpoint describes, to find its linear layers by name."""
    try:
        import eagle_draft
    except ImportError:
        raise UserError("quantizing a draft needs eagle_draft.py, which is not in this checkout")
    from model import ModelArgs
    cfg, sd = ckpt.get("config") or {}, ckpt["state_dict"]
    t = cfg.get("target") or {}
    try:
        n_head = t["num_attention_heads"]
        args = ModelArgs(dim=t["hidden_size"], n_layer=1, n_head=n_head,
                         n_local_heads=t.get("num_key_value_heads") or n_head,
                         head_dim=t.get("head_dim") or t["hidden_size"] // n_head,
                         intermediate_size=t["intermediate_size"], vocab_size=t["vocab_size"])
    except (KeyError, TypeError) as e:
        raise UserError(f"draft checkpoint config lacks the target's {e}; re-save it with eagle_draft.save_draft")
    with torch.device("meta"):
        return eagle_draft.EagleDraft(args, fc_bias=bool(cfg.get("fc_bias", "fc.bias" in sd)),
                                      draft_vocab=sd.get("d2t"))


def quantize_checkpoint(src: Path, mode: str, groupsize: Optional[int], dst: Optional[Path] = None,
                        draft: bool = False, calib_file=None, calib_samples: int = 32, calib_seq_len: int = 512,
                        act_order: bool = False, damp: float = 0.01, progress: bool = True,
                        head: str = "int8") -> Path:
    kind = "eagle_draft" if draft else "target"
    ckpt = read_checkpoint(src, kind)
    if ckpt.get("quantization"):
        raise UserError(f"{src} is already quantized ({ckpt['quantization'].get('mode')}); quantize the float "
                        f"checkpoint instead")
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "int8":
        groupsize = None
    else:
        check_groupsize(groupsize)
    sd = dict(ckpt["state_dict"])
    if draft:
        module = draft_module(ckpt)
        if mode == "int4-gptq":
            raise UserError("GPTQ needs the target's activations; quantize a draft with --mode int4 or int8")
        new_sd, record = quantize_state_dict(module, sd, mode, groupsize, progress=progress)
    else:
        from checkpoint import load_model
        model = load_model(src, "cpu", torch.float32)
        if model.args.tie_embeddings:
            # the head gets its own (quantized) copy; the float embedding stays for the gather
            sd["output.weight"] = sd["tok_embeddings.weight"]
        int8 = int8_linears_for(mode, head)
        if mode == "int4-gptq":
            chunks = calibration_chunks(src, calib_samples, calib_seq_len, calib_file)
            new_sd, record = gptq_transformer(model, sd, chunks, groupsize, progress, int8, damp=damp,
                                              act_order=act_order)
        else:
            new_sd, record = quantize_state_dict(model, sd, mode, groupsize, progress=progress, int8_linears=int8)
    dst = Path(dst) if dst else output_path(Path(src), mode, groupsize)
    out = {k: v for k, v in ckpt.items() if k != "state_dict"}
    out.update(quantization=record, state_dict={k: v.contiguous() for k, v in new_sd.items()})
    atomic_save(out, dst)
    return dst


def build_parser():
    p = argparse.ArgumentParser(description="Weight-only int8/int4 quantization of eaglet checkpoints, and "
                                "its quality report (--eval).")
    p.add_argument("--checkpoint", type=Path, required=True, help="float model.pth (or a draft with --draft)")
    p.add_argument("--mode", default="int8", help="int8 | int4 | int4-gptq")
    p.add_argument("--groupsize", type=int, default=32, help="int4 group size: 32, 64, 128 or 256")
    p.add_argument("--draft", action="store_true", help="the checkpoint is an EAGLE draft")
    p.add_argument("--output", type=Path, help="default: model_<mode>[.g<groupsize>].pth next to the input")
    p.add_argument("--calib-file", type=Path, help="GPTQ calibration text (default: local ShareGPT turns)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diag")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping, fraction of the mean Hessian diag")
    p.add_argument("--head", default="int8", choices=["int8", "int4"],
                   help="int4 modes: keep the output layer in int8 (default; +8%% bytes, most of the quality) "
                        "or quantize it to int4 too")
    p.add_argument("--eval", action="store_true", help="report perplexity and greedy agreement per mode")
    p.add_argument("--modes", default="int8,int4,int4-gptq", help="--eval: modes to compare")
    p.add_argument("--eval-tokens", type=int, default=4096, help="--eval: held-out tokens")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--bench", action="store_true", help="time bf16/int8/int4 linears of this model's shapes")
    p.add_argument("--compile", action="store_true", help="--bench: torch.compile each layer")
    p.add_argument("--dtype", default="bfloat16", help="--eval: activation dtype (bfloat16 | float32)")
    return p


def check_args(a) -> None:
    if a.mode not in MODES:
        raise UserError(f"unknown --mode {a.mode!r}; use one of {', '.join(MODES)}")
    check_groupsize(a.groupsize)
    for name in ("calib_samples", "calib_seq_len", "eval_tokens", "eval_seq_len"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if a.calib_file is not None and not a.calib_file.is_file():
        raise UserError(f"--calib-file {a.calib_file} does not exist")
    if a.dtype not in ("bfloat16", "float32"):
        raise UserError(f"--dtype {a.dtype!r}: use bfloat16 or float32")


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    check_args(a)
    if a.bench:
        print(bench_ops(read_checkpoint(a.checkpoint)["config"], a.groupsize, compile=a.compile))
        return
    if a.eval:
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise UserError(f"--modes: unknown {', '.join(bad)}; use some of {', '.join(MODES)}")
        print(evaluate(a.checkpoint, modes, a.groupsize, a.eval_tokens, a.eval_seq_len,
                       getattr(torch, a.dtype), a))
        return
    dst = quantize_checkpoint(a.checkpoint, a.mode, a.groupsize, a.output, a.draft, a.calib_file,
                              a.calib_samples, a.calib_seq_len, a.act_order, a.damp, head=a.head)
    print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    run_cli(main)
