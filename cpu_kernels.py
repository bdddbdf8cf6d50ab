"""The C++ CPU kernels, built on first use: `torch.ops.eaglet.few_rows_attention` (attention_cpu.cpp, the
compiled decode / verify attention of model.Attention), `torch.ops.eaglet.int4_mm` (int4_cpu.cpp, the matmul
of quantize.WeightOnlyInt4Linear) and `torch.ops.eaglet.int8_mm` (int8_cpu.cpp, quantize.WeightOnlyInt8Linear's
matmul of several bf16 rows, for speculative decoding); the two matmuls need AVX512-BF16.

All are plain C++ with AVX-512 intrinsics, compiled by `torch.utils.cpp_extension.load` into one library
under torch's extensions directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), once per
source and flags (about a minute the first time). Where the CPU lacks AVX-512 or the build fails (one line on
stderr says so), callers keep their PyTorch / aten formulation, which computes the same thing.

A module of its own because both generate.py (attention, at compile time) and quantize.py (int4 packing, at
load time) need it, and nothing may import generate.py.
"""
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
SOURCES = ("attention_cpu.cpp", "int4_cpu.cpp", "int8_cpu.cpp")
_loaded = None   # None: not tried yet; False: unavailable; True: the ops are registered


def load() -> bool:
    """Build (once) and load the kernels; True when torch.ops.eaglet.* are usable on this CPU."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = False
    if not torch.cpu._is_avx512_supported():
        return False
    flags = ["-O3", "-fopenmp", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mf16c",
             "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]   # at::vec's AVX-512 code, as Inductor's kernels
    name = "eaglet_cpu"
    if torch.cpu._is_avx512_bf16_supported():
        flags.append("-mavx512bf16")
        name += "_bf16"
    try:
        if shutil.which("ninja") is None:   # the PyPI wheel's binary, when its bin dir is not on PATH (pyenv)
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        from torch.utils.cpp_extension import load as build
        if not _built_before(name):
            print("eaglet: building the C++ CPU kernels (once, about a minute)", file=sys.stderr, flush=True)
        build(name, [str(ROOT / s) for s in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
              is_python_module=False)
    except Exception as e:   # no compiler, no ninja, a toolchain without these flags: keep the PyTorch path
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"eaglet: the C++ CPU kernels did not build ({why}); attention and int8/int4 matmuls stay in "
              "PyTorch / aten (slower)", file=sys.stderr)
        return False

    # Shapes for tracing (torch.compile calls them as opaque kernels).
    @torch.library.register_fake("eaglet::few_rows_attention")
    def _(q, k, v, mask):
        return q.new_empty(q.shape)

    @torch.library.register_fake("eaglet::int4_mm")
    def _(x, codes, sz, groupsize):
        return x.new_empty(x.shape[0], codes.shape[0] * 16)

    @torch.library.register_fake("eaglet::int8_mm")
    def _(x, w, scales):
        return x.new_empty(x.shape[0], w.shape[0] * 16)

    _loaded = True
    return True


def _built_before(name: str) -> bool:
    """Whether torch's extensions directory already holds a build of `name` (only decides whether to say that
    a build is starting; torch itself decides whether to rebuild)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory   # private: may move in another torch
        return any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:
        return True


def int4_available() -> bool:
    """True when int4_mm and int8_mm run here: the kernels loaded and the CPU has AVX512-BF16 (vdpbf16ps)."""
    return torch.cpu._is_avx512_bf16_supported() and load()


def int8_available() -> bool:
    """True when int8_mm runs here (the same condition as int4_mm: it is the same vdpbf16ps loop)."""
    return int4_available()
