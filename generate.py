"""Generate text with a LLaMA-family checkpoint: the CLI, and the plain decode loop as a library.

Read top to bottom, this is the algorithm:
    load_target      checkpoint → Transformer (+ the tokenizer sitting next to it)
    prefill          run the prompt through the model once, filling the KV cache; sample token 1
    decode_one_token feed one token at one cache slot; sample the next
    generate         prefill, then decode_one_token until a stop id or max_new_tokens
    main             flags → prompt ids → generate (or speculative.speculative_generate) → stream text + stats

Importing this module has no side effects: scripts/benchmark.py runs exactly this loop in-process.

torch.compile: `compile_decode()` swaps the module-level decode step for a compiled one (gpt-fast's
trick). The step has static shapes — token [B, 1], cache slot as a 1-element tensor, preallocated
caches — so it compiles once (fullgraph) and a whole generation never recompiles. On CUDA it uses
CUDA graphs (mode="reduce-overhead"); on CPU Inductor's default C++ backend.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

import cpu_kernels
import model as model_lib
from checkpoint import UserError, load_model, model_bytes, run_cli
from speculative import sample

ROOT = Path(__file__).resolve().parent
DEFAULT_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CHECKPOINT = Path("checkpoints") / DEFAULT_REPO / "model.pth"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Speculative decoding writes a whole draft tree past the accepted prefix before it knows how much of
# it survives, so its cache needs room beyond prompt + max_new_tokens.
SPECULATIVE_SLACK = 128
CACHE_ROUNDING = 256
INTERACTIVE_CACHE = 2048


def resolve_device(name: str) -> str:
    """"auto" → "cuda" when available, else "cpu". Raises UserError for unknown or unavailable devices."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} requested but this PyTorch has no usable CUDA device "
                            f"(use --device cpu or auto)")
        return name
    raise UserError(f"unknown device {name!r} (choose auto, cpu or cuda)")


def load_target(checkpoint, device: str, dtype) -> tuple:
    """(model, tokenizer): the target Transformer from our checkpoint file and the tokenizer files in the
    same directory."""
    from tokenizer import load_tokenizer  # deferred: tests and benchmarks may pass ids directly
    checkpoint = Path(checkpoint)
    model = load_model(checkpoint, device, dtype)
    return model, load_tokenizer(checkpoint.parent)


# ---------------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------------

def prefill(model, idx: Tensor, input_pos: Tensor, temperature: float, top_k: Optional[int],
            top_p: Optional[float], mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Run the prompt idx [B, T] at cache slots input_pos [T]; return (next token [B, 1], hidden [B, T, D]).
    Only the last position goes through lm_head: for a 49k vocabulary the full [T, V] logits would cost
    more than the rest of the prefill for short prompts. The hidden states are EAGLE's features.
    mask: model.causal_rows(...) (bounds the slots attended on CPU), or None for the whole cache."""
    h = model.hidden(idx, input_pos, mask)
    logits = model.output(h[:, -1:])
    return sample(logits, temperature, top_k, top_p), h


def decode_one_token(model, cur: Tensor, input_pos: Tensor, temperature: float, top_k: Optional[int],
                     top_p: Optional[float], mask: Optional[Tensor] = None) -> Tensor:
    """Feed cur [B, 1] at cache slot input_pos [1]; return the sampled next token [B, 1]. mask: as prefill's."""
    logits = model(cur, input_pos, mask)
    return sample(logits, temperature, top_k, top_p)


# What generate() calls; compile_decode / compile_prefill replace these, use_eager restores them.
decode_step = decode_one_token
prefill_step = prefill


def compile_decode(mode: Optional[str] = None, device: Optional[str] = None, model=None):
    """Compile the one-token decode step once, with fullgraph=True so any graph break is an error instead of
    a silent slowdown. mode=None picks "reduce-overhead" (CUDA graphs: one launch per token) when decoding
    on CUDA (`device`, default: CUDA if available) and Inductor's default (C++/OpenMP kernels) on CPU.
    model: the model it will run (picks the CPU matmul kernels, see gemm_template_pays)."""
    global decode_step
    if mode is None:
        mode = "reduce-overhead" if _on_cuda(device) else "default"
    if not _on_cuda(device) and mode == "default" and _undecided_half(model):
        decode_step = choose_half_gemm(model)
    else:
        decode_step = compile_step(decode_one_token, model, device, mode,
                                   template=getattr(model, "half_gemm_template", None))
    return decode_step


def _on_cuda(device) -> bool:
    return torch.cuda.is_available() if device is None else str(device).startswith("cuda")


# Inductor's own C++ GEMM template, autotuned against the library kernel at compile time. At batch 1 (and
# for the few rows of a verify) MKL's fp32 sgemm is far from the memory bound; on this 2-core AVX-512 CPU
# the template halved a SmolLM2-135M fp32 forward (1 token: 38 → 20 ms, 12 tokens: 73 → 37 ms), and it
# took int8/int4 weight-only decoding from ~110/~125 to ~135/~150 tok/s. Costs ~20 s more compile time.
# For bf16/fp16 weights the winner depends on the machine: oneDNN's prepacked linear was faster on one
# 2-core "AMD EPYC" (80 vs 62 tok/s, 2026-11-23), the template on another of the same name (73-75 vs 41-46
# tok/s, 2026-12-01, an AVX512-BF16 Zen 4 without AMX). So compile_decode times both on the model itself
# (choose_half_gemm). That choice is the decode step's; a speculative verify of N tree tokens is timed the
# same way at its own N (speculative.choose_half_verify), since the kernel that wins one row need not win N.
GEMM_TEMPLATE_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                         # keep the autotuner's per-matmul timing tables off the user's stderr
                         "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
# bf16/fp16 and weight-only int8/int4 steps compiled with the template get it for every matmul, without ATen's
# kernels (oneDNN's linear, _weight_int8pack_mm) among the autotuner's choices. The autotuner times each matmul
# alone, its weights hot in the cache, and picked the library kernel for some matmuls, differently from one
# process to the next; in a forward, where the weights stream from memory, that choice was the slow one. On an
# AMD EPYC without AMX (2026-12-07, 30 SmolLM2 MLP blocks, compiled, one process, medians of 30): bf16 with CPP
# and ATEN 6.3 ms at 1 row, 9.6 at 2, 9.1 at 4, the template alone 5.7 / 6.0 / 5.9; int8 at 1 row 5.94 ms with
# both (the autotuner kept ATen's _weight_int8pack_mm, 13 GB/s) against 3.69 ms with the template alone. fp32
# keeps both: there the two lists measured the same (11.6 / 11.7 ms at 1 row, 10.7 / 11.2 at 4). Whole bf16/fp16
# graphs are still timed against oneDNN's (choose_half_gemm, speculative.choose_half_verify).
TEMPLATE_ONLY_OPTIONS = {**GEMM_TEMPLATE_OPTIONS, "max_autotune_gemm_backends": "CPP"}


def linear_kind(model) -> str:
    """What `model`'s matmuls run on, by its first linear layer: "fp32", "half" (bf16/fp16), "quant"
    (quantize.py's weight-only int8 / int4 linears) or "none"."""
    for m in (model.modules() if model is not None else ()):
        if isinstance(m, torch.nn.Linear):
            return "fp32" if m.weight.dtype == torch.float32 else "half"
        if type(m).__name__.startswith("WeightOnlyInt"):
            return "quant"
    return "none"


def gemm_template_pays(model) -> bool:
    """True when `model`'s matmuls are fp32 or weight-only quantized (see GEMM_TEMPLATE_OPTIONS). A
    half-precision decode step is chosen by measurement instead (choose_half_gemm)."""
    return linear_kind(model) in ("fp32", "quant")


def _undecided_half(model) -> bool:
    """A model with half-precision nn.Linear weights whose CPU matmul kernels choose_half_gemm has not chosen."""
    if model is None or hasattr(model, "half_gemm_template"):
        return False
    return linear_kind(model) == "half" and hasattr(model, "causal_rows")


# Two names for the same decode step, so that the two candidates choose_half_gemm compiles are separate
# Dynamo cache entries (entries live on the code object) and the loser can be dropped whole.
def _decode_with_template(model, cur, input_pos, temperature, top_k, top_p, mask=None):
    return decode_one_token(model, cur, input_pos, temperature, top_k, top_p, mask)


def _decode_with_library(model, cur, input_pos, temperature, top_k, top_p, mask=None):
    return decode_one_token(model, cur, input_pos, temperature, top_k, top_p, mask)


def choose_half_gemm(model, reps: int = 7):
    """Compile the decode step of a bf16/fp16 CPU model both with the C++ GEMM template and with oneDNN's
    prepacked linears, time one-token steps of each (interleaved, on the model's own cache; the slot
    written is overwritten by the next prefill), and keep the faster: returns its compiled step and records
    the choice as model.half_gemm_template (a later compile_decode of the model reuses it without timing).
    Costs one extra compilation, once per model. Sets up a small cache if the model has none."""
    if model.max_seq_length <= 0:
        model.setup_caches(1, CACHE_ROUNDING)
    dev = model.tok_embeddings.weight.device
    cur = torch.zeros(model.max_batch_size, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    steps = {True: compile_step(_decode_with_template, model, dev, template=True),
             False: compile_step(_decode_with_library, model, dev, template=False)}
    median = time_candidates(steps, lambda step: step(model, cur, pos, 0.0, None, None, model.causal_rows(0, 1)),
                             reps)
    model.half_gemm_template = median[True] < median[False]
    drop_compiled(_decode_with_library if model.half_gemm_template else _decode_with_template)
    return steps[model.half_gemm_template]


def drop_compiled(fn) -> None:
    """Forget fn's compiled entries, freeing a losing candidate's graph and its packed copy of the weights."""
    reset_code = getattr(torch._C._dynamo.eval_frame, "reset_code", None)
    if reset_code is not None:
        reset_code(fn.__code__)


def time_candidates(steps: dict, call, reps: int = 7) -> dict:
    """{key: median seconds of call(step)} for compiled candidates {key: step}, timed interleaved on a
    noisy machine; the first round compiles and is not counted."""
    times = {k: [] for k in steps}
    with torch.no_grad():
        for _ in range(reps + 1):
            for k, step in steps.items():
                t = time.perf_counter()
                call(step)
                times[k].append(time.perf_counter() - t)
    return {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}


def compile_step(fn, model=None, device: Optional[str] = None, mode: str = "default",
                 template: Optional[bool] = None):
    """torch.compile(fn) the way every step here is compiled: fullgraph, static shapes unless marked
    dynamic (mask widths), frozen weights (+ the GEMM template where it pays, or where `template` says so)
    on CPU. `model` is the model fn runs. The speculative steps keep mode "default" on CUDA too: CUDA graphs would overwrite a step's
    output on the next replay, and a draft round still reads the previous step's hidden state."""
    if not _on_cuda(device):
        cpu_inductor_settings()
        if mode == "default" and (gemm_template_pays(model) if template is None else template):
            options = GEMM_TEMPLATE_OPTIONS if linear_kind(model) == "fp32" else TEMPLATE_ONLY_OPTIONS
            return torch.compile(fn, fullgraph=True, dynamic=False, options=options)
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def skip_guards():
    """Context: compiled steps skip Dynamo's guard checks (torch.compiler.set_stance's
    skip_guard_eval_unsafe). For callers that have just called every step they will call, with the same model
    and the same Python arguments, so that what changes afterwards (tensor values, a mask width marked
    dynamic) cannot fail a guard. Those checks walk the whole module tree (~3000 of them for SmolLM2-135M,
    ~0.7-0.9 ms a call on this 2-core CPU, 6-10% of a decode step). Where a step holds several compiled
    entries (other models, other temperatures), the guards that tell them apart still run."""
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def cpu_inductor_settings() -> None:
    """Inductor on CPU: freeze the weights into the graph. Parameters then become constants that Inductor
    prepacks for oneDNN's matmuls, which on this kind of CPU took bf16 decoding of SmolLM2-135M from ~55 to
    ~73 tok/s (the KV caches are mutated buffers and stay live). The price: a compiled step is tied to the
    weights it was compiled with (a different model object is a different graph anyway, by Dynamo's
    guards), and prepacked copies can add memory. It is a global Inductor setting, so the speculative
    verify and draft steps compiled later in the same process get it too."""
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    # the GEMM autotuner's own use of a deprecated storage API, once per compile: not the user's concern
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning,
                            module=r"torch\._inductor")
    inline_gemm_micro_kernels()
    load_cpu_attention()


HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25   # Linux >= 6.1: back a range with transparent huge pages now, whatever the THP sysfs mode


def huge_pages(tensors=None) -> int:
    """Move the process's resident anonymous memory onto 2 MiB pages now: the weights, the prepacked copies
    Inductor made of them when it compiled the steps, the KV caches. Returns the bytes that moved (0 off
    Linux, before Linux 6.1, or where nothing could move). Call it after the compiled steps have run once
    (their constants exist only from then on); memory allocated later keeps 4 KiB pages.

    Why: a decode step streams every weight once, and with 4 KiB pages it needs a new TLB entry every 64 cache
    lines (a nested page walk inside a VM). THP is "madvise" on most distributions, so torch's tensors get
    4 KiB pages. On an AMD EPYC VM (2 cores, 2026-12-08; 1200 interleaved samples in one process) a one-row
    bf16 GEMV over SmolLM2-135M's weight shapes read 1.19x as fast (median) from huge pages as from torch's
    separate tensors when the memory was fast, 1.11x when it was slow, and a 4 KiB-paged arena as fast as the
    separate tensors (the pages matter, not the layout); a sum over 256 MB, 1.25x and 1.07x. For whole steps
    see HUGE_PAGES_MIN_TOKENS.

    tensors: move only the blocks that hold these tensors' storages (default: every block). Either way a 2 MiB
    block of a private read-write mapping moves only if at least half of it is resident (mincore), so thread
    stacks and reserved but untouched memory do not grow. MADV_COLLAPSE copies: ~2.6 s per GB here."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        pages = HUGE_PAGE // os.sysconf("SC_PAGE_SIZE")
        vec = ctypes.create_string_buffer(pages)
        wanted = None if tensors is None else {
            a for t in tensors for st in [t.untyped_storage()]
            for a in range(st.data_ptr() // HUGE_PAGE * HUGE_PAGE, st.data_ptr() + st.nbytes(), HUGE_PAGE)}
        before = _anon_huge_bytes()
        for lo, hi in _anonymous_mappings():
            for a in range(-(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE):
                if wanted is not None and a not in wanted:
                    continue
                if libc.mincore(a, HUGE_PAGE, vec) == 0 and (pages - vec.raw.count(0)) * 2 >= pages:
                    libc.madvise(a, HUGE_PAGE, MADV_COLLAPSE)   # one block at a time: a refusal stops a range
        return max(0, _anon_huge_bytes() - before)
    except (OSError, AttributeError, ValueError):
        return 0


# Where moving pays (AMD EPYC, 2026-12-08; two compiled SmolLM2-135M models in one process, one moved, steps
# interleaved; /tmp script): bf16 steps 1.06-1.10x faster (8.50 against 9.39 ms at fast memory) for ~1.2 s of
# finding and moving, repaid after ~1400 tokens; fp32 1.02-1.03x for 3.3 s; int4 no difference (its kernel is
# not bound by memory). Both the cost and the gain scale with the weight bytes, so the break-even in tokens
# holds for larger models too.
HUGE_PAGES_MIN_TOKENS = 2048


def wants_huge_pages(a, model) -> bool:
    """--huge-pages: on, off, or auto: bf16/fp16 weights, and a run long enough to repay the move."""
    if a.huge_pages != "auto":
        return a.huge_pages == "on"
    tokens = a.max_new_tokens * a.num_samples * (2 if a.compare_ar else 1)
    return linear_kind(model) == "half" and (a.interactive or tokens >= HUGE_PAGES_MIN_TOKENS)


def large_cpu_tensors(min_bytes: int = 1 << 18) -> list:
    """Every CPU tensor alive in the process with a storage of at least min_bytes, found through the garbage
    collector: that includes the ones only compiled graphs hold (Inductor's prepacked weights), which no
    module attribute leads to. ~0.25 s after a compile here (~800k objects)."""
    import gc
    # type(), not isinstance: isinstance would let in subclasses without memory of their own (fake, functional
    # tensors), and a dead weak proxy among gc's objects raises on it
    return [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)
            and o.device.type == "cpu" and o.layout == torch.strided and o.untyped_storage().nbytes() >= min_bytes]


def _anonymous_mappings():
    """(start, end) of this process's private read-write anonymous mappings (and [heap]) of at least 2 MiB that
    are not all on huge pages already (/proc/self/smaps)."""
    out, cur = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 6)
            if "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                name = head[5].strip() if len(head) > 5 else ""
                cur = None
                if head[1] == "rw-p" and name in ("", "[heap]") and hi - lo >= HUGE_PAGE:
                    cur = {"range": (lo, hi)}
                    out.append(cur)
            elif cur is not None and head[0] in ("Rss:", "AnonHugePages:"):
                cur[head[0]] = int(head[1]) * 1024
    return [m["range"] for m in out if m.get("AnonHugePages:", 0) < m.get("Rss:", 0)]


def _anon_huge_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def load_cpu_attention():
    """Make compiled CPU attention of a few rows use the C++ kernel (cpu_kernels: attention_cpu.cpp) by setting
    model.FEW_ROWS_KERNEL. Returns the op, or None where the CPU lacks AVX-512 or the build fails; the model
    then keeps its PyTorch formulation (model.few_rows_attention), which computes the same thing."""
    if cpu_kernels.load():
        model_lib.FEW_ROWS_KERNEL = torch.ops.eaglet.few_rows_attention
    return model_lib.FEW_ROWS_KERNEL


# Inductor's C++ GEMM template (fp32 compute: fp32 and bf16/fp16 weights without AMX, weight-only int8/int4) runs
# a register-blocked micro-kernel per row count (1..8 rows). Each is declared plain `inline`, and GCC 12 inlines
# only the smaller ones: the others stay out-of-line functions whose accumulators array GCC also keeps on the
# stack, one 64-byte store per FMA in the inner loop (seen in the assembly). On an AMD EPYC (2026-12-02) that was
# most of the "cost jumps at the fifth row" of the fp32 verify: 30 SmolLM2 MLPs in fp32 cost 8.4 ms at 4 rows,
# 11.6 at 5, 16.0 at 8 before, and 7.7 / 8.2 / 9.9 ms with the kernels forced inline (one process, medians of 25);
# bf16 weights 6.9 -> 4.8 ms at 4 rows (two processes: noisier). In the compiled SmolLM2 fp32 forward over 8
# tokens: 52.6 -> 31.8 ms, with 4 tokens unchanged (24.8 / 25.4; one process, medians of 20). Forcing them inline
# changes no arithmetic, only where the accumulators live.
_MICRO_GEMM_DECL = "\ninline void {{kernel_name}}"
_MICRO_GEMM_INLINE = "\n__attribute__((always_inline)) inline void {{kernel_name}}"
# The same kernel with bf16/fp16 weights loads each 16-weight vector with a counted (masked) load, which GCC
# treats as a load that may read the accumulators: it writes every accumulator back to the stack after each FMA
# (dead stores, seen in the assembly at 4, 6 and 8 rows). A plain full-width load of the same 16 weights
# (at::vec::load_to_float) reads the same numbers and lets the accumulators live in registers.
_MICRO_GEMM_HALF_LOAD = ("auto b = VectorizedIn::loadu(B + k * ldb + col * VLEN, VLEN);\n"
                         "            vb[col] = at::vec::convert<{{compute_t}}>(b);")
_MICRO_GEMM_HALF_LOAD_FIXED = "at::vec::load_to_float(B + k * ldb + col * VLEN, vb[col]);"
# bf16 weights and activations on a CPU with AVX512-BF16: two steps of k in one vdpbf16ps per 16 outputs (one
# instruction multiplies a pair of bf16 weights by a pair of activations and adds both products) instead of two
# converts and two FMAs. The template's B rows k and k+1 are interleaved into pairs with one vpermt2w, shared by
# every row of A. At one row the GEMM is memory-bound and this changes nothing; at 4-8 rows (a tree verify) it is
# compute-bound in fp32 FMAs. A C++ test of the same loops on a 49152x576 bf16 matrix (AMD EPYC, 2 threads,
# 2026-12-07): 1 row 47-50 vs 41-47 GB/s, 4 rows 41-43 vs 48, 8 rows 23-24 vs 38-40 (FMA vs vdpbf16ps). The
# instruction is written as inline assembly because Inductor compiles for an AVX512-VNNI CPU without
# -mavx512bf16 (VecAVX512VNNI.build_arch_flags drops it), and the loop is only emitted where the CPU has it
# and Inductor builds for AVX-512.
# Products are exact in fp32 either way; the pair's two products are summed before they are added, which moves
# bf16 results by fp32 rounding only.
_MICRO_GEMM_K_LOOP = ("    for (int k = 0; k < K; ++k) {\n"
                      "        c10::ForcedUnroll<ROWS * COLS>{}(compute, k);\n"
                      "    }")
_MICRO_GEMM_K_LOOP_DPBF16 = """{%- if input_dtype == torch.bfloat16 and input2_dtype == torch.bfloat16 and alpha == 1 and not tail_n %}
    int64_t k_pairs_end = 0;
    if constexpr (VLEN == 16) {
        static const int16_t pair_words[32] = {
            {%- for i in range(16) %}{{i}}, {{32 + i}}{{ ", " if not loop.last }}{%- endfor %}};
        const __m512i pair_idx = _mm512_loadu_si512(pair_words);
        k_pairs_end = K & ~int64_t(1);
        for (int64_t k = 0; k < k_pairs_end; k += 2) {
            c10::ForcedUnroll<COLS>{}([&](auto col) {
                const __m512i r0 = _mm512_castsi256_si512(
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + k * ldb + col * VLEN)));
                const __m512i r1 = _mm512_castsi256_si512(
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B + (k + 1) * ldb + col * VLEN)));
                const __m512i pair = _mm512_permutex2var_epi16(r0, pair_idx, r1);
                c10::ForcedUnroll<ROWS>{}([&](auto row) {
                    int32_t a2;
                    std::memcpy(&a2, A + row * lda + k, sizeof(a2));
                    constexpr int idx = row * COLS + col;
                    __m512 acc = vc[idx];
                    asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(_mm512_set1_epi32(a2)), "v"(pair));
                    vc[idx] = acc;
                });
            });
        }
    }
    for (int64_t k = k_pairs_end; k < K; ++k) {
        c10::ForcedUnroll<ROWS * COLS>{}(compute, k);
    }
{%- else %}
""" + _MICRO_GEMM_K_LOOP + """
{%- endif %}"""


def inline_gemm_micro_kernels() -> bool:
    """Declare the GEMM template's micro-kernels always_inline (see _MICRO_GEMM_DECL) and give its bf16/fp16
    weight loads a full-width load (_MICRO_GEMM_HALF_LOAD). A patch of Inductor's code-generation templates:
    if a PyTorch version words them differently, that part is not patched (the template still works, only
    without the fix), and this returns False when the inline part is not; tests pin that both apply to ours."""
    import torch._inductor.compile_fx  # noqa: F401  (imports the codegen modules in their working order)
    import torch._inductor.config as inductor_config
    from torch._inductor.codegen import cpp_micro_gemm
    from torch._inductor.cpu_vec_isa import VecAVX512, pick_vec_isa   # AVX2 builds lack the 512-bit intrinsics
    from torch._inductor.custom_graph_pass import CustomGraphPass
    patched = False
    for name in ("CppMicroGemmFP32Vec", "CppMicroGemmWoQInt4Avx512"):
        cls = getattr(cpp_micro_gemm, name, None)
        src = getattr(cls, "TEMPLATE_KERNEL", None)
        if not isinstance(src, str):
            continue
        if _MICRO_GEMM_INLINE not in src and _MICRO_GEMM_DECL in src:
            cls.TEMPLATE_KERNEL = src = src.replace(_MICRO_GEMM_DECL, _MICRO_GEMM_INLINE)
        if _MICRO_GEMM_HALF_LOAD in src:
            cls.TEMPLATE_KERNEL = src = src.replace(_MICRO_GEMM_HALF_LOAD, _MICRO_GEMM_HALF_LOAD_FIXED)
        if (name == "CppMicroGemmFP32Vec" and src.count(_MICRO_GEMM_K_LOOP) == 1 and "pair_idx" not in src
                and torch.cpu._is_avx512_bf16_supported() and isinstance(pick_vec_isa(), VecAVX512)):
            cls.TEMPLATE_KERNEL = src.replace(_MICRO_GEMM_K_LOOP, _MICRO_GEMM_K_LOOP_DPBF16)
        patched = patched or _MICRO_GEMM_INLINE in cls.TEMPLATE_KERNEL
    if patched and inductor_config.post_grad_custom_post_pass is None:
        class InlineMicroGemmKey(CustomGraphPass):
            """A no-op post-grad pass whose uuid puts the patch into Inductor's FX-graph cache key: a graph
            compiled and cached on disk before it must not come back with the old kernels."""
            def __call__(self, graph):
                return None

            def uuid(self):
                dp = "pair_idx" in cpp_micro_gemm.CppMicroGemmFP32Vec.TEMPLATE_KERNEL
                return "eaglet-inline-micro-gemm-3" + ("-dpbf16" if dp else "")
        inductor_config.post_grad_custom_post_pass = InlineMicroGemmKey()
    return patched


def compile_prefill():
    """Compile prefill with dynamic shapes: prompt lengths vary, and one symbolic-length graph beats a
    recompilation per length."""
    global prefill_step
    prefill_step = torch.compile(prefill, fullgraph=True, dynamic=True)
    return prefill_step


def use_eager():
    """Undo compile_decode / compile_prefill (tests compare both paths in one process)."""
    global decode_step, prefill_step
    decode_step, prefill_step = decode_one_token, prefill


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_cache_length(model, needed: int) -> int:
    """Slots for `needed` tokens, rounded up to a multiple of 256 (so nearby lengths share one compiled
    graph) and capped by the model's max_position_embeddings."""
    cap = model.args.max_position_embeddings
    if needed > cap:
        raise ValueError(f"{needed} tokens exceed the model's max_position_embeddings {cap}")
    return min(cap, CACHE_ROUNDING * math.ceil(needed / CACHE_ROUNDING))


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, stop_ids: Sequence[int] = (),
             callback: Optional[Callable[[int, list], None]] = None, start_pos: int = 0) -> tuple:
    """Plain autoregressive decoding.

    prompt: [T] or [B, T] token ids on the model's device. Returns (tokens, stats):
      tokens — one list per batch row of the new tokens only; a row ends at its first stop id (included)
               or after max_new_tokens.
      stats  — new_tokens (all rows), prompt_tokens, cached_prompt_tokens (= start_pos), batch_size,
               decode_steps, time_to_first_token_s,
               decode_s, decode_tokens_per_s (decode steps per second after the first token; at batch 1
               that is tokens/s, and it is what weight bandwidth is proportional to).
    callback(row, ids) is called as tokens are appended to a row (ids is a list; the stop id is included,
    a streaming caller drops it). Speculative decoding calls it the same way with several ids at once.

    Caches: if the model has none, or they are for another batch size, or too short for
    T + max_new_tokens, generate allocates them (length rounded up to 256). Callers that want a fixed
    cache (the CLI's --max-seq-length, benchmarks) call model.setup_caches first; it is reused as is.
    start_pos: prompt[:, :start_pos] is already in the cache (a chat turn reusing the conversation so far);
    only the rest is prefilled.
    """
    if prompt.dim() == 1:
        prompt = prompt[None]
    B, T = prompt.shape
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if not 0 <= start_pos < T:
        raise ValueError(f"start_pos {start_pos} must leave at least one prompt token to prefill (T={T})")
    # The last sampled token is never fed back, so T + max_new_tokens - 1 slots would do; asking for one
    # more keeps the rule simple and matches the CLI's check.
    needed = T + max_new_tokens
    if model.max_batch_size != B or model.max_seq_length < needed:
        model.setup_caches(B, default_cache_length(model, needed))
    device = prompt.device
    stop = set(int(s) for s in stop_ids)
    # Host-side stop checks need the token on the host; on CPU that is free, on CUDA it is one small sync
    # per step, which streaming needs anyway. Without a callback or stop ids, CUDA syncs once at the end.
    check_each_step = bool(stop) or callback is not None or device.type != "cuda"

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    def accept(ids: list) -> None:
        for row, tok in enumerate(ids):
            if done[row]:
                continue
            out[row].append(tok)
            if callback is not None:
                callback(row, [tok])
            if tok in stop or len(out[row]) >= max_new_tokens:
                done[row] = True

    t0 = time.perf_counter()
    input_pos = torch.arange(start_pos, T, device=device)
    cur, _ = prefill_step(model, prompt[:, start_pos:], input_pos, temperature, top_k, top_p,
                          model.causal_rows(start_pos, T))
    cur = cur.clone()  # CUDA graphs reuse output memory on the next replay
    accept(cur.view(-1).tolist())
    t_first = time.perf_counter()

    pos = torch.tensor([T], device=device, dtype=torch.long)
    pending: list[Tensor] = []
    steps = 0
    p = T   # pos on the host, for the mask's width: no sync needed to know it
    with contextlib.ExitStack() as steady:
        while not all(done) and steps + 1 < max_new_tokens:
            nxt = decode_step(model, cur, pos, temperature, top_k, top_p, model.causal_rows(p, p + 1)).clone()
            if steps == 0 and decode_step is not decode_one_token:
                steady.enter_context(skip_guards())
            pos += 1  # in place: the compiled step sees the same tensor, only its value changes
            p += 1
            cur = nxt
            steps += 1
            if check_each_step:
                accept(cur.view(-1).tolist())
            else:
                pending.append(cur)
    if pending:  # one sync for the whole run; columns are steps
        for ids in torch.cat(pending, dim=1).t().tolist():
            accept(ids)
    _sync(device)
    t_end = time.perf_counter()
    decode_s = t_end - t_first
    stats = {
        "prompt_tokens": T,
        "cached_prompt_tokens": start_pos,
        "batch_size": B,
        "new_tokens": sum(len(r) for r in out),
        "decode_steps": steps,
        "time_to_first_token_s": t_first - t0,
        "decode_s": decode_s,
        "decode_tokens_per_s": steps / decode_s if steps and decode_s > 0 else 0.0,
    }
    return out, stats


# ---------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError: one `error: ...` line and exit 2, like every other mistake."""

    def error(self, message):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Generate text with a LLaMA-family checkpoint (plain or speculative decoding).")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"our model.pth (default: {DEFAULT_CHECKPOINT}, prepared on first use)")
    p.add_argument("--prompt", default=None, help='prompt text (default "Hello, my name is"; '
                   'with --chat, the user message)')
    p.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat/--interactive "
                   "(replaces the template's default one)")
    p.add_argument("--interactive", action="store_true", help="chat REPL keeping the conversation; Ctrl-D exits")
    p.add_argument("--max-new-tokens", type=int, default=200, help="stop after this many tokens (default 200)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) = greedy: deterministic, and what speculative decoding reproduces "
                        "token for token; try 0.7 with --top-p 0.9 for varied text")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--num-samples", type=int, default=1, help="generate this many times (stats each)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--batch-size", type=int, default=1, help="decode this many copies of the prompt at once")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--compile-prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                   help="weights and KV cache (default bf16; fp16 runs on CPU too, but slower than bf16)")
    p.add_argument("--max-seq-length", type=int, default=None,
                   help="KV-cache slots (default: prompt + max new tokens, rounded up to 256)")
    p.add_argument("--huge-pages", default="auto", choices=["auto", "on", "off"],
                   help="CPU, Linux >= 6.1: move the weights onto 2 MiB pages before decoding (bf16 steps "
                        "6-10%% faster here, ~1.2 s for SmolLM2-135M); auto = bf16/fp16 weights and a run that "
                        "decodes >= %d tokens or is --interactive" % HUGE_PAGES_MIN_TOKENS)
    p.add_argument("--profile", type=Path, default=None, help="write a Chrome trace of the last sample here")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample instead of text")
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--speculate", action="store_true",
                   help="draft tokens and verify them with the target: same output as plain decoding")
    s.add_argument("--spec-method", default="eagle", choices=["eagle", "draft", "lookup"])
    s.add_argument("--draft", type=Path, default=None, help="EAGLE draft checkpoint")
    s.add_argument("--draft-checkpoint", type=Path, default=None, help="small draft model (--spec-method draft)")
    s.add_argument("--tree", default="dynamic", choices=["dynamic", "static", "chain"])
    s.add_argument("--tree-depth", type=int, default=None, help="draft tokens per branch")
    s.add_argument("--tree-topk", type=int, default=None, help="children per draft node")
    s.add_argument("--tree-tokens", default=None, help="draft tokens verified per step: N or auto (measured)")
    s.add_argument("--draft-vocab", type=int, default=None,
                   help="shrink the EAGLE draft vocabulary to its N most frequent tokens (CPU default: 4096)")
    s.add_argument("--draft-quant", default=None, choices=["none", "int8"],
                   help="run a float EAGLE draft in int8 (CPU default) or as stored (none); its proposals only, output unchanged")
    s.add_argument("--lookup-branch", type=int, default=None,
                   help="EAGLE: add a prompt-lookup chain of N tokens to greedy trees when the context's last "
                        "n-gram occurred before (0: none; default 6, none for bf16/fp16 on a CPU)")
    s.add_argument("--compare-ar", action="store_true",
                   help="also run plain decoding on the same prompt; report speedup and token agreement")
    return p


def check_args(a) -> None:
    if a.temperature < 0 or not math.isfinite(a.temperature):
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}")
    if a.top_k is not None and a.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {a.top_p}")
    for flag in ("max_new_tokens", "num_samples", "batch_size", "max_seq_length", "tree_depth", "tree_topk",
                 "draft_vocab"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if a.lookup_branch is not None and a.lookup_branch < 0:
        raise UserError(f"--lookup-branch must be >= 0 (0 = none), got {a.lookup_branch}")
    if a.tree_tokens is not None and a.tree_tokens != "auto" and not (a.tree_tokens.isdigit()
                                                                      and int(a.tree_tokens) >= 1):
        raise UserError(f"--tree-tokens must be a positive integer or 'auto', got {a.tree_tokens!r}")
    if a.system is not None and not (a.chat or a.interactive):
        raise UserError("--system needs --chat or --interactive")
    if a.interactive and (a.json or a.batch_size > 1 or a.num_samples > 1):
        raise UserError("--interactive works with one conversation: drop --json/--batch-size/--num-samples")
    if a.compare_ar and not a.speculate:
        raise UserError("--compare-ar compares against --speculate; add --speculate")


def resolve_checkpoint(path: Optional[Path]) -> Path:
    """The --checkpoint file, or the default model, prepared on first use by scripts/download.py."""
    if path is not None:
        return path
    default = ROOT / DEFAULT_CHECKPOINT
    if default.exists():
        return default
    script = ROOT / "scripts" / "download.py"
    if not script.exists():
        raise UserError(f"default model {default} is missing and {script} is not there to prepare it; "
                        f"pass --checkpoint")
    spec = importlib.util.spec_from_file_location("eaglet_download", script)
    download = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(download)
    return Path(download.prepare_default_model(checkpoints_dir=ROOT / "checkpoints"))


def cache_length(a, model, prompt_len: int) -> int:
    """--max-seq-length, checked against the prompt and --max-new-tokens; or a default that fits them."""
    cap = model.args.max_position_embeddings
    slack = SPECULATIVE_SLACK if a.speculate else 0
    needed = prompt_len + a.max_new_tokens + slack
    if a.max_seq_length is None:
        if a.interactive:
            return min(cap, max(INTERACTIVE_CACHE, CACHE_ROUNDING * math.ceil(needed / CACHE_ROUNDING)))
        if needed > cap:
            raise UserError(f"prompt ({prompt_len} tokens) + --max-new-tokens {a.max_new_tokens}"
                            f"{f' + {slack} speculative slack' if slack else ''} exceed the model's context "
                            f"of {cap} tokens; shorten the prompt or lower --max-new-tokens")
        return default_cache_length(model, needed)
    msl = a.max_seq_length
    if msl > cap:
        raise UserError(f"--max-seq-length {msl} exceeds the model's context of {cap} tokens")
    if prompt_len >= msl:
        raise UserError(f"the prompt has {prompt_len} tokens, more than --max-seq-length {msl} leaves room "
                        f"for; raise --max-seq-length or shorten the prompt")
    if needed > msl and not a.interactive:
        raise UserError(f"--max-new-tokens {a.max_new_tokens} does not fit the cache: prompt {prompt_len}"
                        f"{f' + {slack} speculative slack' if slack else ''} + {a.max_new_tokens} > "
                        f"--max-seq-length {msl}; raise --max-seq-length or lower --max-new-tokens")
    return msl


def speculative_generator(a, model, device: str, dtype) -> Callable:
    """The one place the CLI hands over to speculative decoding (speculative.py). Returns a function with
    generate()'s signature and return shape, so streaming, --json and stats are shared by both paths."""
    import speculative
    if a.batch_size != 1:
        raise UserError("--speculate decodes one sequence at a time; drop --batch-size")
    drafter = speculative.build_drafter(
        a.spec_method, model, draft_path=a.draft, draft_checkpoint=a.draft_checkpoint, tree=a.tree,
        tree_depth=a.tree_depth, tree_topk=a.tree_topk,
        tree_tokens=a.tree_tokens if a.tree_tokens in (None, "auto") else int(a.tree_tokens),
        draft_vocab=a.draft_vocab, draft_quant=a.draft_quant, device=device, dtype=dtype, compile=a.compile,
        lookup_branch=a.lookup_branch)

    def run(model, prompt, max_new_tokens, *, callback=None, start_pos=0, **kw):
        # start_pos is ignored: the speculative path prefills the whole prompt (its drafter needs the
        # target's hidden states for all of it)
        cb = None if callback is None else (lambda ids: callback(0, ids))
        tokens, stats = speculative.speculative_generate(model, drafter, prompt, max_new_tokens,
                                                         callback=cb, **kw)
        stats.setdefault("batch_size", 1)
        return [tokens], stats
    return run


def encode_prompt(a, tok, text: str) -> list:
    if a.chat:
        messages = ([{"role": "system", "content": a.system}] if a.system is not None else [])
        return list(tok.encode_chat(messages + [{"role": "user", "content": text}]))
    return list(tok.encode(text))


def stats_line(stats: dict, nbytes: int, label: str = "") -> str:
    bw = nbytes * stats["decode_tokens_per_s"] / 1e9
    extra = f", {stats['mean_accepted']:.2f} tokens per target step" if "mean_accepted" in stats else ""
    cached = stats.get("cached_prompt_tokens", 0)
    cached = f", {cached} of them already cached" if cached else ""
    return (f"{label}{stats['new_tokens']} tokens (prompt {stats['prompt_tokens']}{cached}, batch "
            f"{stats['batch_size']}), time to first token {stats['time_to_first_token_s']:.3f} s, decode "
            f"{stats['decode_tokens_per_s']:.1f} tok/s, bandwidth {bw:.2f} GB/s "
            f"(weights {nbytes / 1e6:.1f} MB per step, KV cache not counted){extra}")


class _Streamer:
    """Prints row 0's text as it is generated, dropping stop ids."""

    def __init__(self, tok, stop_ids):
        from tokenizer import StreamDecoder
        self.dec, self.stop = StreamDecoder(tok), stop_ids

    def __call__(self, row: int, ids: list) -> None:
        if row:
            return
        self._write("".join(self.dec.push(i) for i in ids if i not in self.stop))

    def finish(self) -> None:
        """Print what the decoder held back (an incomplete UTF-8 character at the very end) and a newline."""
        self._write(self.dec.flush() + "\n")

    @staticmethod
    def _write(text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()


def _strip_stop(ids: list, stop) -> tuple[list, str]:
    if ids and ids[-1] in stop:
        return ids[:-1], "stop"
    return ids, "length"


def _profiled(path: Path, fn):
    """Run fn under torch.profiler and write a Chrome trace to path (temp file + rename)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=False) as prof:
        result = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    prof.export_chrome_trace(str(tmp))
    os.replace(tmp, path)
    print(f"profile written to {path}", file=sys.stderr)
    return result


def interactive(a, model, tok, gen, stop, max_seq_length: int, nbytes: int) -> None:
    """Chat REPL. Each turn re-renders the whole conversation with the chat template; the part of it
    already in the KV cache (everything up to the last reply's stop token) is not prefilled again."""
    system = [{"role": "system", "content": a.system}] if a.system is not None else []
    messages = list(system)
    cached: list[int] = []  # token ids whose keys/values sit in cache slots 0..len-1
    reuse = not a.speculate
    first = a.prompt
    print("chat: type a message, Ctrl-D to quit", file=sys.stderr)
    while True:
        if first is not None:
            user, first = first, None
            print(f"> {user}", flush=True)
        else:
            try:
                user = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        ids = list(tok.encode_chat(messages))
        if len(ids) >= max_seq_length:
            print(f"(the conversation no longer fits the {max_seq_length}-token cache; starting a new one; "
                  f"use --max-seq-length for longer chats)", file=sys.stderr)
            messages, cached = system + [messages[-1]], []
            ids = list(tok.encode_chat(messages))
            if len(ids) >= max_seq_length:
                print(f"(that message alone is {len(ids)} tokens, more than the cache holds)", file=sys.stderr)
                messages = list(system)
                continue
        start = 0
        if reuse:
            while start < min(len(cached), len(ids) - 1) and cached[start] == ids[start]:
                start += 1
        max_new = min(a.max_new_tokens, max_seq_length - len(ids))
        prompt = torch.tensor(ids, device=a.device_resolved)
        streamer = _Streamer(tok, stop)
        tokens, stats = gen(model, prompt, max_new, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            stop_ids=stop, callback=streamer, start_pos=start)
        reply, _ = _strip_stop(tokens[0], stop)
        streamer.finish()
        messages.append({"role": "assistant", "content": tok.decode(reply)})
        cached = ids + tokens[0][:-1]  # the last sampled token was never fed to the model
        print(stats_line(stats, nbytes), file=sys.stderr)


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    check_args(a)
    device = resolve_device(a.device)
    a.device_resolved = device
    dtype = DTYPES[a.dtype]
    if a.seed is not None:
        torch.manual_seed(a.seed)
    ckpt = resolve_checkpoint(a.checkpoint)
    model, tok = load_target(ckpt, device, dtype)
    stop = set(tok.stop_ids) | set(model.args.eos_token_ids)
    nbytes = model_bytes(model)
    if a.interactive:
        a.chat = True
    text = a.prompt if a.prompt is not None else "Hello, my name is"

    ids = encode_prompt(a, tok, text)
    if not ids:
        raise UserError("the prompt encodes to no tokens; give a non-empty --prompt")
    msl = cache_length(a, model, len(ids))
    model.setup_caches(a.batch_size, msl)

    gen = speculative_generator(a, model, device, dtype) if a.speculate else generate
    if a.compile:
        compile_decode(device=device, model=model)
    if a.compile_prefill:
        compile_prefill()
    if a.compile or a.compile_prefill:
        t = time.perf_counter()
        warm = torch.tensor(ids, device=device).expand(a.batch_size, -1)
        for g in ([gen, generate] if a.compare_ar else [gen]):
            g(model, warm, min(8, a.max_new_tokens), temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
        print(f"compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        if a.seed is not None:  # so a compiled run samples what an eager run with this seed samples
            torch.manual_seed(a.seed)
    if device == "cpu" and wants_huge_pages(a, model):
        huge_pages(large_cpu_tensors())   # after the warm-up: the compiled steps' prepacked weights exist by now

    if a.interactive:
        return interactive(a, model, tok, gen, stop, msl, nbytes)

    prompt = torch.tensor(ids, device=device).expand(a.batch_size, -1).contiguous()
    stream = not a.json and a.batch_size == 1
    for i in range(a.num_samples):
        streamer = _Streamer(tok, stop) if stream else None

        def one():
            return gen(model, prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                       top_p=a.top_p, stop_ids=stop, callback=streamer)
        if a.profile is not None and i == a.num_samples - 1:
            tokens, stats = _profiled(a.profile, one)
        else:
            tokens, stats = one()
        label = f"[sample {i + 1}/{a.num_samples}] " if a.num_samples > 1 else ""
        if a.json:
            for row, toks in enumerate(tokens):
                kept, reason = _strip_stop(toks, stop)
                rec = {"sample": i, "row": row, "text": tok.decode(kept), "tokens": kept,
                       "new_tokens": len(kept), "finish_reason": reason, "prompt_tokens": len(ids),
                       "decode_tokens_per_s": stats["decode_tokens_per_s"],
                       "time_to_first_token_s": stats["time_to_first_token_s"],
                       "bandwidth_gb_s": nbytes * stats["decode_tokens_per_s"] / 1e9}
                rec.update({k: v for k, v in stats.items() if k not in rec and k != "new_tokens"})
                print(json.dumps(rec), flush=True)
        elif stream:
            streamer.finish()
        else:
            for row, toks in enumerate(tokens):
                print(f"--- row {row}\n{tok.decode(_strip_stop(toks, stop)[0])}", flush=True)
        print(stats_line(stats, nbytes, label), file=sys.stderr)
        if a.compare_ar:
            ar_tokens, ar_stats = generate(model, prompt, a.max_new_tokens, temperature=a.temperature,
                                           top_k=a.top_k, top_p=a.top_p, stop_ids=stop)
            same = sum(x == y for r1, r2 in zip(tokens, ar_tokens) for x, y in zip(r1, r2))
            total = max(1, sum(max(len(r1), len(r2)) for r1, r2 in zip(tokens, ar_tokens)))
            ar_tps = ar_stats["decode_tokens_per_s"]
            speedup = stats["decode_tokens_per_s"] / ar_tps if ar_tps else float("nan")
            print(stats_line(ar_stats, nbytes, "plain decoding: ") +
                  f"; speculative speedup {speedup:.2f}x, token agreement {same}/{total}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
