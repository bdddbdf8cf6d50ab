#!/usr/bin/env python
"""Speed and acceptance benchmark: plain decoding vs every drafter vs peers, measured side by side.

    python scripts/benchmark.py --prompts mt_bench --limit 20 --methods ar,eagle,lookup --temperature 0 --compile

Why it is shaped this way: on a shared, noisy machine absolute tokens/s drift by tens of percent over minutes,
but two runs a second apart see the same machine. So every configuration is measured in ONE process, prompt by
prompt: for each prompt the plain (`ar`) baseline runs first and then every other method on the very same
prompt, and speedups are ratios of those neighbours. Warm-up runs (which also trigger torch.compile) are
discarded.

Outputs in --out DIR: results.json (every per-prompt record, the summary, the machine and the command),
results.md (the table) and results.png (speedup and τ per method). scripts/readme_perf.py turns
results.json into the README's Performance section.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from typing import Optional  # noqa: E402

from checkpoint import UserError, atomic_write_text, model_bytes, run_cli  # noqa: E402

DEFAULT_CHECKPOINT = "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth"
# ar-eager: plain decoding without torch.compile, in the same run as a compiled `ar` (with --compile)
# eagle-nolookup: EAGLE's trees without the prompt-lookup branch (speculative.LookupBranchDrafter)
METHODS = ("ar", "ar-eager", "eagle", "eagle-nolookup", "eagle-chain", "eagle-static", "draft", "lookup")
TREE_OF = {"eagle": "dynamic", "eagle-nolookup": "dynamic", "eagle-chain": "chain", "eagle-static": "static"}
PEERS = ("hf", "llamacpp")
# precision -> (activation dtype, file next to model.pth holding the weights, quantize.py --mode)
PRECISIONS = {
    "fp32": (torch.float32, None, None),
    "bf16": (torch.bfloat16, None, None),
    "fp16": (torch.float16, None, None),
    "int8": (torch.bfloat16, "model_int8.pth", "int8"),
    "int4": (torch.bfloat16, "model_int4.g32.pth", "int4"),
}
HF_LOOKUP_TOKENS = 10
# --random-model: random weights in a published model's shape, for decode speed where the real weights cannot be
# had (a GPU machine with no network, a model too large to download here). The tokens such a model emits mean
# nothing, so its rows are speed-only: no stop tokens (every prompt decodes --max-new-tokens), no speculation.
# The shapes are those of the models' HF config.json files.
RANDOM_SHAPES = {
    "llama-2-7b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
                       eos_token_id=128001),
}
# gpt-fast's published batch-1 decode speed for Llama-2-7B on an A100-80GB (its README; compiled, int4 groupsize
# 32), the figures eaglet's random-weight llama-2-7b rows are set against
GPT_FAST_A100_LLAMA2_7B = {"bf16": 104.9, "int8": 155.6, "int4": 196.8}


# ----------------------------------------------------------------------------------------------- prompts

def load_prompts(spec: str, limit: int | None, turns: int, raw: bool) -> list[dict]:
    """Prompt set → [{"id", "turns": [str, ...], "raw": bool}]. Raw prompts are completed as plain text
    (HumanEval is code completion: a chat template would only change what is being measured)."""
    if spec == "mt_bench":
        import assets
        rows = [json.loads(line) for line in Path(assets.fetch("mt_bench")).read_text().splitlines() if line.strip()]
        items = [{"id": f"mt_bench/{r['question_id']}", "turns": list(r["turns"]), "raw": raw} for r in rows]
    elif spec == "humaneval":
        import assets
        with gzip.open(assets.fetch("humaneval"), "rt") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        items = [{"id": r["task_id"], "turns": [r["prompt"]], "raw": True} for r in rows]
    else:
        path = Path(spec)
        if not path.exists():
            raise UserError(f"--prompts: {spec} is neither mt_bench, humaneval nor an existing JSONL file")
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})")
            if isinstance(r, dict) and isinstance(r.get("prompt"), str):
                t = [r["prompt"]]
            elif isinstance(r, dict) and isinstance(r.get("turns"), list) and r["turns"] \
                    and all(isinstance(x, str) for x in r["turns"]):
                t = list(r["turns"])
            else:
                raise UserError(f'{path}:{n}: each line must be {{"prompt": "..."}} or {{"turns": ["...", ...]}}')
            items.append({"id": str(r.get("id", f"{path.stem}/{n}")), "turns": t, "raw": raw or bool(r.get("raw"))})
        if not items:
            raise UserError(f"--prompts: {path} holds no prompts")
    for it in items:
        it["turns"] = it["turns"][:1] if it["raw"] else it["turns"][:turns]
    return items[:limit] if limit else items


# ------------------------------------------------------------------------------------------- statistics

def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def acceptance_by_depth(hist: list[int]) -> list[float]:
    """hist[k] = rounds that accepted exactly k drafted tokens (bonus token not counted) → for d = 1..K the
    fraction of rounds that accepted at least d drafted tokens (the usual "acceptance rate at depth d")."""
    total = sum(hist)
    if not total:
        return []
    return [sum(hist[d:]) / total for d in range(1, len(hist))]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(records: list[dict], model_bytes_of: dict, roofline: dict) -> list[dict]:
    """One row per (precision, temperature, method) with aggregate and median speeds, ratios to `ar` over the
    same prompts, τ, acceptance by depth, TTFT, peak memory, bandwidth and greedy agreement with `ar`."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["precision"], r["temperature"], r["method"]), []).append(r)
    rows = []
    base_prec = records[0]["precision"] if records else None
    base_rate = {}
    for (prec, temp, method), recs in groups.items():
        if prec == base_prec and method == "ar":
            t = sum(r["decode_s"] for r in recs)
            base_rate[temp] = sum(r["decode_tok_s"] * r["decode_s"] for r in recs) / t if t > 0 else None
    for (prec, temp, method), recs in groups.items():
        ar = {(r["prompt_id"], r["turn"]): r for r in groups.get((prec, temp, "ar"), [])}
        dec_tokens = sum(r["decode_tok_s"] * r["decode_s"] for r in recs)
        dec_time = sum(r["decode_s"] for r in recs)
        agg = dec_tokens / dec_time if dec_time > 0 else None
        paired = [(r, ar[(r["prompt_id"], r["turn"])]) for r in recs if (r["prompt_id"], r["turn"]) in ar]
        ar_tokens = sum(a["decode_tok_s"] * a["decode_s"] for _, a in paired)
        ar_time = sum(a["decode_s"] for _, a in paired)
        ar_agg = ar_tokens / ar_time if ar_time > 0 else None
        row = {
            "precision": prec, "temperature": temp, "method": method, "n": len(recs),
            "new_tokens": sum(r["new_tokens"] for r in recs),
            "tok_s": agg, "tok_s_median": _median([r["decode_tok_s"] for r in recs]),
            "speedup": agg / ar_agg if agg and ar_agg else None,
            "speedup_median": _median([r["decode_tok_s"] / a["decode_tok_s"] for r, a in paired
                                       if a["decode_tok_s"]]),
            # the cross-precision ratio (int8 vs bf16): to the first precision's `ar` at this temperature
            "vs_base_ar": agg / base_rate[temp] if agg and base_rate.get(temp) else None, "base_precision": base_prec,
            "ttft_ms_median": _median([r["ttft_s"] * 1e3 if r["ttft_s"] is not None else None for r in recs]),
            "peak_mem_mb": max((r["peak_mem_bytes"] or 0) for r in recs) / 2**20 or None,
        }
        rounds = sum(r["rounds"] or 0 for r in recs)
        if method in ("ar", "ar-eager"):
            row["tau"] = 1.0
        elif rounds:
            row["tau"] = sum((r["mean_accepted"] or 0) * (r["rounds"] or 0) for r in recs) / rounds
        else:
            row["tau"] = None
        if rounds and any(r.get("lookup_rounds") is not None for r in recs):
            # EAGLE with lookup nodes (speculative.LookupBranchDrafter): the share of rounds that had them
            row["lookup_round_share"] = sum(r.get("lookup_rounds") or 0 for r in recs) / rounds
        hists = [r["accept_hist"] for r in recs if r.get("accept_hist")]
        if hists:
            width = max(len(h) for h in hists)
            total = [sum(h[i] if i < len(h) else 0 for h in hists) for i in range(width)]
            row["accept_hist"] = total
            row["accept_by_depth"] = acceptance_by_depth(total)
        if method in ("ar", "ar-eager", "hf", "hf-static") and agg and prec in model_bytes_of:
            row["bandwidth_gb_s"] = model_bytes_of[prec] * agg / 1e9
            if roofline.get("tok_s", {}).get(prec):
                row["roofline_fraction"] = agg / roofline["tok_s"][prec]
            if all(r.get("probe_gb_s") for r in recs):
                # against the probe taken beside each prompt: bytes read / bytes the memory gave in that time
                row["paired_roofline_fraction"] = model_bytes_of[prec] * dec_tokens / sum(
                    r["decode_s"] * r["probe_gb_s"] * 1e9 for r in recs)
        if temp == 0 and method != "ar" and paired:
            same = [r["same_as_ar"] for r, _ in paired]
            row["identical"] = sum(bool(s) for s in same)
            row["compared"] = len(same)
            divs = [r["first_divergence"] for r, _ in paired if r["first_divergence"] is not None]
            row["first_divergence_min"] = min(divs) if divs else None
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS + tuple(f"hf{s}" for s in ("", "-lookup", "-static")) + ("llamacpp",))}
    rows.sort(key=lambda r: (r["precision"], r["temperature"], order.get(r["method"], 99), r["method"]))
    return rows


def _fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


TABLE_COLUMNS = ["precision", "T", "method", "prompts", "tok/s", "tok/s (median)", "speedup", "speedup (median)",
                 "vs base ar", "τ", "accept@1,2,3…", "TTFT ms", "peak MB", "GB/s", "same text as ar"]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        acc = "/".join(f"{a:.2f}" for a in r.get("accept_by_depth", [])[:6]) or "–"
        same = f"{r['identical']}/{r['compared']}" if "identical" in r else "–"
        bw = _fmt(r.get("bandwidth_gb_s"), ".2f")
        if r.get("roofline_fraction"):
            bw += f" ({r['roofline_fraction']:.0%} of roofline" + (
                f", {r['paired_roofline_fraction']:.0%} paired)" if r.get("paired_roofline_fraction") else ")")
        method = r["method"] + (" (random weights: speed only)" if r.get("speed_only") else "")
        cells = [r["precision"], _fmt(r["temperature"], "g"), method, str(r["n"]), _fmt(r["tok_s"]),
                 _fmt(r["tok_s_median"]), _fmt(r["speedup"], ".2f") + ("×" if r["speedup"] else ""),
                 _fmt(r["speedup_median"], ".2f") + ("×" if r["speedup_median"] else ""),
                 _fmt(r.get("vs_base_ar"), ".2f") + ("×" if r.get("vs_base_ar") else ""), _fmt(r["tau"], ".2f"),
                 acc, _fmt(r["ttft_ms_median"], ".0f"), _fmt(r["peak_mem_mb"], ".0f"), bw, same]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    m, roof = results["machine"], results["roofline"]
    out = [f"# eaglet benchmark — {results['config']['prompts']} ({results['config']['n_prompts']} prompts, "
           f"{results['config']['max_new_tokens']} new tokens)", "",
           f"`{results['command']}`", "",
           f"Machine: {machine_line(m)}. Measured read bandwidth {roof['bandwidth_gb_s']:.1f} GB/s "
           f"→ roofline " + ", ".join(f"{p} {t:.0f} tok/s" for p, t in roof["tok_s"].items()) + "." +
           (f" After the warm-up {roof['huge_pages_bytes'] / 2**20:.0f} MiB of tensors (weights, prepacked copies, "
            "caches) moved onto 2 MiB pages." if roof.get("huge_pages_bytes") else ""), "",
           *(f"{line}\n" for line in [random_model_note(results)] if line),
           markdown_table(results["summary"]),
           "tok/s = decode tokens per second (aggregate: all decode tokens / all decode time; median over prompts). "
           "speedup = ratio to `ar` on the same prompts in the same run; vs base ar = ratio to the first precision's "
           f"`ar` ({results['config']['precisions'][0]}). τ = tokens accepted per target forward "
           "(bonus token included). accept@d = fraction of rounds accepting ≥ d drafted tokens. "
           "same text as ar (temperature 0 only) = outputs token-identical to plain decoding. " + ROOFLINE_LEGEND]
    return "\n".join(out) + "\n"


ROOFLINE_LEGEND = ("GB/s = weight bytes a decode step reads × tok/s; \"of roofline\" divides it by the best "
                   "bandwidth probe of the run, \"paired\" by the probe taken right after each prompt (the memory's "
                   "speed moves minute to minute).")


def random_model_note(results: dict) -> str:
    """For a --random-model run: what the rows are, and gpt-fast's published figures where its shape has them."""
    spec = results["config"].get("random_model")
    if not spec:
        return ""
    note = (f"Model: random weights in the shape of `{spec}`: speed only (the tokens mean nothing; every prompt "
            f"decodes all {results['config']['max_new_tokens']} tokens).")
    if spec == "llama-2-7b":
        note += " gpt-fast's published Llama-2-7B figures (A100-80GB, batch 1, compiled): " + ", ".join(
            f"{p} {t} tok/s" for p, t in GPT_FAST_A100_LLAMA2_7B.items()) + "."
    return note


def machine_line(m: dict) -> str:
    dev = m.get("gpu") or f"{m['cpu']} ({m['cores']} cores, {m['threads']} torch threads)"
    return f"{dev}, torch {m['torch']}, {m['date']}"


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = sorted({(r["precision"], r["temperature"]) for r in rows})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(configs))
    for ax, key, title in ((axes[0], "speedup", "decode speedup vs ar (same run)"),
                           (axes[1], "tau", "τ: tokens per target forward")):
        shown = methods if key == "speedup" else [m for m in methods if any(
            r["method"] == m and r.get("tau") is not None for r in rows)]  # peers report no τ
        for j, (prec, temp) in enumerate(configs):
            vals = []
            for m in shown:
                r = next((r for r in rows if (r["precision"], r["temperature"], r["method"]) == (prec, temp, m)),
                         None)
                vals.append(r[key] if r and r.get(key) is not None else 0.0)
            ax.bar([i + j * width for i in range(len(shown))], vals, width, label=f"{prec} T={temp:g}")
        ax.set_xticks([i + width * (len(configs) - 1) / 2 for i in range(len(shown))])
        ax.set_xticklabels(shown, rotation=30, ha="right")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------- machine facts

def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def measure_bandwidth(device: str, nbytes: int = 1 << 28, repeats: int = 10, buffer=None) -> float:
    """Achievable memory read bandwidth in GB/s: best of `repeats` sums over a buffer far larger than any
    cache. A decode step reads every weight once, so bandwidth / weight bytes is the tok/s ceiling.
    `buffer` reuses a probe buffer (the short probes taken beside every prompt)."""
    x = _probe_buffer(nbytes, device) if buffer is None else buffer
    nbytes = x.numel() * x.element_size()
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        _sync(device)
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best / 1e9


def _probe_buffer(nbytes: int, device: str) -> torch.Tensor:
    """nbytes of fp32 ones. On a Linux CPU the buffer is 2 MiB-aligned and advised into transparent huge
    pages before it is touched, so the probe reads as fast as any buffer can and the roofline errs high, never
    low. On an AMD EPYC VM (2026-12-08, interleaved in one process) a sum read 1.25x as fast (median) from huge
    pages as from 4 KiB pages when the memory was fast and 1.07x when it was slow; the tensors get the same
    treatment after the warm-up (generate.huge_pages).
    Elsewhere (or if madvise is missing) it is an ordinary tensor."""
    if device != "cpu":
        return torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    huge = 2 << 20
    raw = torch.empty(nbytes + huge, dtype=torch.uint8)
    buf = raw[(-raw.data_ptr()) % huge:][:nbytes]
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(buf.data_ptr(), nbytes, 14)   # MADV_HUGEPAGE; an error leaves ordinary pages
    except (OSError, AttributeError):
        pass
    return buf.view(torch.float32).fill_(1.0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Memory one run needs beyond what is already resident (every precision's weights stay loaded, so the
    process-wide peak would be the sum of all of them). CUDA: the allocator's high-water mark above the
    allocation at reset. CPU: peak RSS (VmHWM) above RSS at reset; Linux lets a process restart VmHWM by
    writing 5 to /proc/self/clear_refs. Where that is not possible the transient part reads as 0."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base = 0

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS:") or 0
        except OSError:
            self.base = None

    def read(self) -> int:
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        hwm = self._status("VmHWM:")
        return max(0, hwm - self.base) if hwm is not None and self.base is not None else 0


# ------------------------------------------------------------------------------------------- the runners

def quantized_checkpoint(checkpoint: Path, precision: str) -> Path:
    """The weights file for a precision; int8/int4 files are made by quantize.py on first use."""
    _, name, mode = PRECISIONS[precision]
    if name is None:
        return checkpoint
    path = checkpoint.parent / name
    from quantize import has_layout
    if not has_layout(path, mode):
        print(f"{path} is missing or has an older layout; running quantize.py --mode {mode} ...", file=sys.stderr)
        run_quantize(["--checkpoint", str(checkpoint), "--mode", mode], path)
    return path


def run_quantize(argv: list, dst: Path) -> None:
    """quantize.py in a subprocess (it loads the float model; the benchmark keeps only what it runs)."""
    r = subprocess.run([sys.executable, str(ROOT / "quantize.py"), *argv])
    if r.returncode != 0 or not dst.exists():
        raise UserError(f"could not make {dst} (python quantize.py {' '.join(argv)} exited with {r.returncode})")


def quantized_draft(draft: Optional[str], target, checkpoint: Path, precision: str) -> Optional[str]:
    """At int8/int4 the EAGLE draft is quantized the same way as the target (EAGLE + gpt-fast's int4 target
    + int4 draft); the file is made once, beside the target's quantized weights."""
    import speculative as S
    _, name, mode = PRECISIONS[precision]
    if name is None:
        return draft
    src = Path(draft) if draft else S.shipped_draft(target)
    if src is None:
        return draft               # build_drafter reports the missing draft
    from quantize import output_path
    dst = checkpoint.parent / output_path(Path(src), mode, 32 if mode != "int8" else None).name
    if not dst.exists() or dst.stat().st_mtime < Path(src).stat().st_mtime:
        run_quantize(["--checkpoint", str(src), "--draft", "--mode", mode, "--output", str(dst)], dst)
    return str(dst)


def random_model(spec: str, precision: str, device: str, seed: int = 0):
    """A Transformer of RANDOM_SHAPES[spec] (or of the HF config.json at path `spec`) with random weights,
    made directly on `device` in the precision's dtype (no full-size float copy on the way), quantized in
    memory the way quantize.py writes files (int4: groupsize 32, int8 head) for int8/int4. Speed only.
    device "meta": the shape alone, nothing allocated or initialized."""
    from checkpoint import model_args
    from model import Transformer
    if spec in RANDOM_SHAPES:
        config = RANDOM_SHAPES[spec]
    else:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"--random-model: {spec} is neither one of {', '.join(RANDOM_SHAPES)} nor a config.json")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--random-model: {path} is not valid JSON ({e.msg})")
    args = model_args(config)
    dtype, _, mode = PRECISIONS[precision]
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    if args.tie_embeddings:                     # to_empty gives each name its own tensor
        model.output.weight = model.tok_embeddings.weight
    gen = torch.Generator(device=device).manual_seed(seed) if device != "meta" else None
    with torch.no_grad():
        for name, p in model.named_parameters() if gen is not None else ():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:                               # HF's initializer_range; biases small too
                p.normal_(0.0, 0.02, generator=gen)
    if mode is not None:
        import quantize
        quantize.quantize_module(model, mode, None if mode == "int8" else quantize.GROUPSIZES[0],
                                 int8_linears=quantize.int8_linears_for(mode, "int8"))
    return model.eval()


class Ours:
    """Our engine: `ar` through generate.generate, every other method through speculative_generate."""

    def __init__(self, args, precision: str, device: str):
        import generate as G
        self.G, self.args = G, args
        dtype = PRECISIONS[precision][0]
        if args.random_model:
            self.model, self.tokenizer = random_model(args.random_model, precision, device, args.seed), None
        else:
            self.model, self.tokenizer = G.load_target(str(quantized_checkpoint(Path(args.checkpoint), precision)),
                                                       device, dtype)
        if args.compile:
            G.compile_decode(model=self.model)
        if args.compile_prefill:
            G.compile_prefill()
        # this precision's own compiled steps: all precisions are loaded up front and the next one's
        # compile_decode replaces the module-level step (whose compile options depend on the dtype)
        self.steps = (G.decode_step, G.prefill_step)
        self.drafters = {}
        draft = None
        if any(m in TREE_OF for m in args.methods):
            draft = quantized_draft(args.draft, self.model, Path(args.checkpoint), precision)
        for m in args.methods:
            if m in ("ar", "ar-eager"):
                continue
            import speculative as S
            kw = {k: v for k, v in (("tree_depth", args.tree_depth), ("tree_topk", args.tree_topk),
                                    ("tree_tokens", args.tree_tokens), ("draft_vocab", args.draft_vocab),
                                    ("draft_quant", args.draft_quant if PRECISIONS[precision][1] is None else None),
                                    ("lookup_branch", 0 if m == "eagle-nolookup" else args.lookup_branch))
                  if v is not None}
            self.drafters[m] = S.build_drafter(
                "eagle" if m in TREE_OF else m, self.model, draft_path=draft,
                draft_checkpoint=args.draft_checkpoint, tree=TREE_OF.get(m, "chain"),
                device=device, dtype=dtype, compile=args.compile, **kw)
        self.bytes = model_bytes(self.model)

    def encode(self, item: dict, turn: int, history: list[str]) -> list[int]:
        """Token ids for turn `turn` of a prompt; `history` holds the answers to the earlier turns. A random
        model has no tokenizer: it gets random ids, one per word of the prompt (about what a tokenizer makes of
        English), the same ones for every method and precision."""
        if self.tokenizer is None:
            import zlib
            gen = torch.Generator().manual_seed(zlib.crc32(item["id"].encode()))
            n = max(1, len(item["turns"][0].split()))
            return torch.randint(self.model.args.vocab_size, (n,), generator=gen).tolist()
        if item["raw"]:
            return list(self.tokenizer.encode(item["turns"][0]))
        messages = []
        for i in range(turn + 1):
            messages.append({"role": "user", "content": item["turns"][i]})
            if i < turn:
                messages.append({"role": "assistant", "content": history[i]})
        return list(self.tokenizer.encode_chat(messages))

    def fix_cache(self, prompts: list[dict], max_new_tokens: int) -> int:
        """Allocate the KV cache once, long enough for the longest conversation in the set (later turns carry
        earlier answers) plus the speculative tree's slack. Every method then reuses the same cache, and a
        compiled step never sees a new cache shape mid-benchmark."""
        need = 0
        for item in prompts:
            n = len(self.encode(item, 0, []))
            for t in item["turns"][1:]:
                n += len(self.tokenizer.encode(t)) + 32  # role headers of the answer and the new turn
            need = max(need, n + max_new_tokens * len(item["turns"]))
        need += getattr(self.G, "SPECULATIVE_SLACK", 128) + 1
        cap = self.model.args.max_position_embeddings
        if need > cap:
            raise UserError(f"the longest prompt needs {need} cache slots but the model allows {cap}; "
                            f"lower --max-new-tokens or --turns, or drop the longest prompts")
        length = min(cap, 256 * -(-need // 256))
        self.model.setup_caches(1, length)
        return length

    def resident_bytes(self) -> dict:
        """Bytes each method keeps resident: the target's weights and caches, plus the drafter's own modules
        (an EAGLE layer or a draft LM; tensors shared with the target counted once)."""
        def tensors(mod):
            return list(mod.parameters()) + list(mod.buffers())

        base = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors(self.model)}
        out = {"ar": sum(base.values()), "ar-eager": sum(base.values())}
        for m, d in self.drafters.items():
            extra = {}
            owners = [d] + ([d.eagle] if "eagle" in vars(d) else [])      # a LookupBranchDrafter wraps one
            for v in (v for o in owners for v in vars(o).values()):
                if isinstance(v, torch.nn.Module) and v is not self.model:
                    for t in tensors(v):
                        ptr = t.untyped_storage().data_ptr()
                        if ptr not in base:
                            extra[ptr] = t.untyped_storage().nbytes()
            out[m] = out["ar"] + sum(extra.values())
        return out

    @property
    def stop_ids(self) -> tuple:
        return tuple(self.tokenizer.stop_ids) if self.tokenizer is not None else ()

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        stop = set(self.tokenizer.stop_ids)
        return self.tokenizer.decode([t for t in ids if t not in stop])

    def run(self, method: str, ids: list[int], temperature: float, max_new_tokens: int) -> dict:
        a = self.args
        prompt = torch.tensor(ids, dtype=torch.long, device=self.model_device)
        kw = dict(temperature=temperature, top_k=a.top_k, top_p=a.top_p, stop_ids=self.stop_ids)
        if method in ("ar", "ar-eager"):
            G, compiled = self.G, (self.G.decode_step, self.G.prefill_step)
            G.decode_step, G.prefill_step = (G.decode_one_token, G.prefill) if method == "ar-eager" else self.steps
            try:
                tokens, st = G.generate(self.model, prompt, max_new_tokens, **kw)
            finally:
                G.decode_step, G.prefill_step = compiled
            new = list(tokens[0])
        else:
            import speculative as S
            new, st = S.speculative_generate(self.model, self.drafters[method], prompt, max_new_tokens, **kw)
            new = list(new)
        return {"tokens": new, "new_tokens": st["new_tokens"], "ttft_s": st.get("time_to_first_token_s"),
                "decode_s": st["decode_s"], "decode_tok_s": st["decode_tokens_per_s"],
                "rounds": st.get("rounds", st["new_tokens"] if method.startswith("ar") else None),
                "mean_accepted": st.get("mean_accepted", 1.0 if method.startswith("ar") else None),
                "accept_hist": list(st["accept_hist"]) if st.get("accept_hist") is not None else None,
                "lookup_rounds": st.get("lookup_rounds")}

    @property
    def model_device(self):
        return self.model.tok_embeddings.weight.device


class _Clock:
    """A transformers streamer that only timestamps: the first put() is the prompt, the second the first new
    token, so time to first token and decode time are measured the way ours are."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        self.times.append(time.perf_counter())


class HFPeer:
    """transformers' own generate on the same weights (the HF directory next to model.pth)."""

    def __init__(self, args, precision: str, device: str, stop_ids, cache_len: int):
        import transformers
        self.transformers = transformers
        hf_dir = Path(args.checkpoint).parent
        if not (hf_dir / "config.json").exists() or not (list(hf_dir.glob("*.safetensors"))
                                                         or list(hf_dir.glob("pytorch_model*.bin"))):
            raise UserError(f"--peer hf needs the Hugging Face files (config.json + *.safetensors) in {hf_dir}")
        self.device, self.stop_ids, self.cache_len = device, list(stop_ids), cache_len
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=PRECISIONS[precision][0]).to(device).eval()
        self.variants = ["hf", "hf-lookup"] + (["hf-static"] if args.compile else [])

    def run(self, variant: str, ids: list[int], temperature: float, max_new_tokens: int, top_k, top_p) -> dict:
        # A fresh config, not the model's generation_config.json: that may carry sampling defaults
        # (top_k=50, repetition penalties) that our engine does not apply.
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0) \
            if temperature > 0 else dict(do_sample=False)
        gc = self.transformers.GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids or None,
                                                pad_token_id=(self.stop_ids or [0])[0], **sampling)
        if variant == "hf-lookup":
            gc.prompt_lookup_num_tokens = HF_LOOKUP_TOKENS
        extra = {}
        if variant == "hf-static":
            # transformers' compiled path: a static cache and its own torch.compile of the decode forward
            # (by default only on GPUs; _compile_all_devices opts CPUs in). One cache length for every prompt
            # keeps the compiled graph's shapes fixed, like our fix_cache.
            cc = self.transformers.CompileConfig(fullgraph=True, mode="default" if self.device == "cpu"
                                                 else "reduce-overhead")
            cc._compile_all_devices = True
            gc.compile_config = cc
            extra["past_key_values"] = self.transformers.StaticCache(config=self.model.config,
                                                                     max_cache_len=self.cache_len)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        clock = _Clock()
        _sync(self.device)
        t0 = time.perf_counter()
        # Our CPU compile freezes weights (a global Inductor setting); transformers' static cache is a
        # module attribute mutated in place, which freezing would fold into a constant: compile theirs unfrozen.
        import torch._inductor.config as inductor_config
        with torch.inference_mode(), inductor_config.patch(freezing=False):
            out = self.model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc, streamer=clock,
                                      **extra)
        _sync(self.device)
        t_end = time.perf_counter()
        new = out[0, len(ids):].tolist()
        ttft = clock.times[1] - t0 if len(clock.times) > 2 else t_end - t0
        decode_s = t_end - (t0 + ttft)
        rate = (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else 0.0
        return {"tokens": new, "new_tokens": len(new), "ttft_s": ttft, "decode_s": decode_s, "decode_tok_s": rate,
                "rounds": None, "mean_accepted": None, "accept_hist": None}


class LlamaCppPeer:
    """llama.cpp through llama_cpp on a GGUF of the same model (--gguf, default: the GGUF the default model is
    made from). Different kernels and, for that GGUF, Q4_1 weights: a reference point, not a lossless peer."""

    def __init__(self, args):
        import llama_cpp
        gguf = args.gguf
        if gguf is None:
            import assets
            gguf = str(assets.fetch("smollm2_gguf"))
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=4096, n_threads=torch.get_num_threads(), verbose=False)

    def run(self, ids: list[int], temperature: float, max_new_tokens: int, stop_ids) -> dict:
        stop = set(stop_ids)
        t0 = time.perf_counter()
        t_first, new = None, []
        # Plain sampling as ours does it: no min-p, no repetition penalty (llama_cpp's defaults have both).
        for tok in self.llm.generate(ids, temp=temperature, top_k=0 if temperature else 1, top_p=1.0, min_p=0.0,
                                     repeat_penalty=1.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            new.append(int(tok))
            if tok in stop or len(new) >= max_new_tokens:
                break
        t_end = time.perf_counter()
        decode_s = t_end - (t_first or t_end)
        return {"tokens": new, "new_tokens": len(new), "ttft_s": (t_first or t_end) - t0, "decode_s": decode_s,
                "decode_tok_s": (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else 0.0,
                "rounds": None, "mean_accepted": None, "accept_hist": None}


# ------------------------------------------------------------------------------------------------- main

class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error on two lines; our CLIs say what is wrong on one line."""

    def error(self, message):
        raise UserError(message)


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="target model.pth")
    p.add_argument("--prompts", default="mt_bench", help="mt_bench | humaneval | FILE.jsonl")
    p.add_argument("--limit", type=int, default=None, help="first N prompts")
    p.add_argument("--turns", type=int, default=1, choices=(1, 2),
                   help="2: also run each prompt's second turn after the model's own first answer")
    p.add_argument("--raw", action="store_true", help="no chat template (humaneval is always raw)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--methods", default="ar,eagle,lookup", help=",".join(METHODS))
    p.add_argument("--precisions", default="fp32", help=",".join(PRECISIONS))
    p.add_argument("--temperature", default="0", help="comma-separated, e.g. 0,1")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode and verify steps")
    p.add_argument("--compile-prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--draft", default=None, help="EAGLE draft checkpoint (default: the one shipped for the model)")
    p.add_argument("--draft-checkpoint", default=None, help="separate draft LM for --methods draft")
    p.add_argument("--tree-depth", type=int, default=None)
    p.add_argument("--tree-topk", type=int, default=None)
    p.add_argument("--tree-tokens", default=None, help="int or auto")
    p.add_argument("--draft-vocab", type=int, default=None)
    p.add_argument("--draft-quant", default=None, choices=["none", "int8"],
                   help="int8 (CPU default for a float EAGLE draft) or none")
    p.add_argument("--lookup-branch", type=int, default=None,
                   help="prompt-lookup tokens added to EAGLE's greedy trees (0: none; default speculative.LOOKUP_BRANCH)")
    p.add_argument("--random-model", default=None, metavar="SHAPE",
                   help=f"speed only: random weights in a model's shape ({', '.join(RANDOM_SHAPES)}, or an HF "
                        "config.json) instead of --checkpoint; methods ar / ar-eager")
    p.add_argument("--peer", default="", help="comma-separated: hf, llamacpp")
    p.add_argument("--gguf", default=None, help="GGUF for --peer llamacpp")
    p.add_argument("--out", default="results", help="output directory")
    p.add_argument("--readme", default=None,
                   help="also rewrite this README's Performance section from the results (scripts/readme_perf.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="prompts run (and discarded) before measuring")
    args = p.parse_args(argv)

    def split(s):
        return [x.strip() for x in s.split(",") if x.strip()]

    args.methods = split(args.methods)
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        raise UserError(f"--methods: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(METHODS)}")
    if "ar" in args.methods:
        args.methods.remove("ar")
    args.methods = ["ar"] + list(dict.fromkeys(args.methods))  # ar is every ratio's denominator
    args.precisions = split(args.precisions)
    bad = [x for x in args.precisions if x not in PRECISIONS]
    if bad or not args.precisions:
        raise UserError(f"--precisions: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(PRECISIONS)}")
    try:
        args.temperatures = [float(t) for t in split(args.temperature)]
    except ValueError:
        raise UserError(f"--temperature: {args.temperature!r} is not a comma-separated list of numbers")
    if not args.temperatures or any(t < 0 for t in args.temperatures):
        raise UserError("--temperature: give one or more values >= 0, e.g. 0 or 0,1")
    args.peers = split(args.peer)
    bad = [x for x in args.peers if x not in PEERS]
    if bad:
        raise UserError(f"--peer: unknown {', '.join(bad)}; choose from {', '.join(PEERS)}")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if args.warmup < 0:
        raise UserError("--warmup must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise UserError("--top-k must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if args.lookup_branch is not None and args.lookup_branch < 0:
        raise UserError("--lookup-branch must be >= 0 (0 = none)")
    if args.tree_tokens is not None and args.tree_tokens != "auto":
        try:
            args.tree_tokens = int(args.tree_tokens)
        except ValueError:
            raise UserError("--tree-tokens must be an integer or auto")
    if "draft" in args.methods and not args.draft_checkpoint:
        raise UserError("--methods draft needs --draft-checkpoint PATH (a small target-format model.pth)")
    if "hf" in args.peers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("--peer hf needs Hugging Face transformers: pip install transformers")
    if args.readme:
        text = Path(args.readme).read_text() if Path(args.readme).exists() else ""
        if text.count("<!-- perf:start -->") != 1 or text.count("<!-- perf:end -->") != 1:
            raise UserError(f"--readme {args.readme} needs one '<!-- perf:start -->' and one '<!-- perf:end -->' "
                            f"marker (checked before the run so it is not wasted)")
    if args.random_model:
        other = [m for m in args.methods if m not in ("ar", "ar-eager")]
        if other or args.peers or args.turns != 1:
            raise UserError(f"--random-model measures plain decoding speed only (methods ar, ar-eager; one turn; no "
                            f"peers): drop {', '.join(other + args.peers) or '--turns'}")
        if args.random_model not in RANDOM_SHAPES and not Path(args.random_model).is_file():
            raise UserError(f"--random-model: {args.random_model} is neither one of {', '.join(RANDOM_SHAPES)} nor "
                            f"a config.json")
    elif not Path(args.checkpoint).exists():
        raise UserError(f"checkpoint not found: {args.checkpoint} (run `python generate.py` once to prepare the "
                        f"default model, or convert_hf_checkpoint.py)")
    return args


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    from tqdm import tqdm
    import generate as G

    device = str(G.resolve_device(args.device))
    prompts = load_prompts(args.prompts, args.limit, args.turns, args.raw)
    peers = list(args.peers)
    if "llamacpp" in peers:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("skipping --peer llamacpp: llama_cpp is not installed (pip install llama-cpp-python)",
                  file=sys.stderr)
            peers.remove("llamacpp")
    torch.manual_seed(args.seed)
    probe = _probe_buffer(1 << 28, device)
    bandwidth = measure_bandwidth(device, buffer=probe)
    print(f"measured read bandwidth: {bandwidth:.1f} GB/s", file=sys.stderr)

    # Every precision is loaded up front and interleaved prompt by prompt too, so cross-precision ratios
    # (int8 vs bf16) hold on a noisy machine as well as method ratios do.
    engines, model_bytes_of, peer_bytes = {}, {}, {}
    for precision in args.precisions:
        ours = Ours(args, precision, device)
        model_bytes_of[precision] = ours.bytes
        cache_len = ours.fix_cache(prompts, args.max_new_tokens)
        runners = {m: (lambda ids, t, n, m=m, o=ours: o.run(m, ids, t, n)) for m in args.methods}
        # transformers has no loader for our quantized files: its rows exist for float precisions only.
        if "hf" in peers and PRECISIONS[precision][1] is None:
            hf = HFPeer(args, precision, device, ours.tokenizer.stop_ids, cache_len)
            for v in hf.variants:
                runners[v] = lambda ids, t, n, v=v, hf=hf: hf.run(v, ids, t, n, args.top_k, args.top_p)
                peer_bytes.setdefault(precision, {})[v] = model_bytes(hf.model)
        if "llamacpp" in peers and precision == args.precisions[0]:
            lc = LlamaCppPeer(args)
            runners["llamacpp"] = lambda ids, t, n, o=ours: lc.run(ids, t, n, o.tokenizer.stop_ids)
        engines[precision] = (ours, runners)

    # Warm-up: compiles, faults weights in, settles caches. Short generations suffice because the decode
    # and verify steps have static shapes.
    for item in prompts[:args.warmup]:
        for ours, runners in engines.values():
            ids = ours.encode(item, 0, [])
            for temp in args.temperatures:
                for fn in runners.values():
                    fn(ids, temp, min(args.max_new_tokens, 32))

    # After the warm-up, so that the compiled steps' prepacked weights exist: every engine of the process (the
    # peers' weights too) then reads its weights through 2 MiB pages, as the bandwidth probe does.
    huge = G.huge_pages(G.large_cpu_tensors()) if device == "cpu" else 0
    # After the warm-up, so drafters' caches (allocated on first use) count as resident, not transient.
    resident = {p: {**ours.resident_bytes(), **peer_bytes.get(p, {})} for p, (ours, _) in engines.items()}
    records, peak, probes = [], PeakMemory(device), []
    for pi, item in enumerate(tqdm(prompts, desc="prompts", file=sys.stderr)):
        for temp in args.temperatures:
            for precision, (ours, runners) in engines.items():
                history, n_before = [], len(records)
                for turn in range(len(item["turns"])):
                    ids = ours.encode(item, turn, history)
                    ar_tokens = None
                    for name, fn in runners.items():
                        # Same seed for every method on a prompt: at T>0 the outputs still differ (different
                        # numbers of draws) but no method gets a luckier stream on purpose.
                        torch.manual_seed(args.seed * 1_000_003 + pi * 101 + turn)
                        peak.reset()
                        r = fn(ids, temp, args.max_new_tokens)
                        held = resident[precision]
                        r["peak_mem_bytes"] = held.get(name, held["ar"]) + peak.read()
                        if name == "ar":
                            ar_tokens = r["tokens"]
                        div = first_divergence(r["tokens"], ar_tokens) if ar_tokens is not None else None
                        r.update(precision=precision, temperature=temp, method=name, prompt_id=item["id"],
                                 turn=turn + 1, prompt_tokens=len(ids), text=ours.decode(r["tokens"]),
                                 same_as_ar=(div is None) if temp == 0 and ar_tokens is not None else None,
                                 first_divergence=div if temp == 0 else None)
                        records.append(r)
                    # The next turn continues from ar's answer so every method sees the same context.
                    history.append(ours.decode(ar_tokens))
                # A short probe right after these runs (~4 sums, well under a second) for the paired roofline.
                speed = measure_bandwidth(device, repeats=3, buffer=probe)
                probes.append(speed)
                for r in records[n_before:]:
                    r["probe_gb_s"] = speed
    del engines

    # The memory system of a shared machine is not steady (28-64 GB/s on this one, minute to minute): measure
    # again after the run and keep the best of every probe, so the roofline is what the machine gave at its
    # best; the per-prompt probes give the paired fraction, against what it gave at the time.
    samples = [bandwidth, measure_bandwidth(device, buffer=probe)]
    del probe
    bandwidth = max(samples + probes)
    roofline = {"bandwidth_gb_s": bandwidth, "bandwidth_samples_gb_s": samples, "prompt_probes_gb_s": probes,
                "model_bytes": model_bytes_of, "huge_pages_bytes": huge,
                "tok_s": {p: bandwidth * 1e9 / b for p, b in model_bytes_of.items()}}
    summary = summarize(records, model_bytes_of, roofline)
    if args.random_model:
        for row in summary:
            row["speed_only"] = True
    results = {
        "command": "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None
                                                                                   else sys.argv[1:]))),
        "machine": machine_info(device),
        "config": {"checkpoint": None if args.random_model else args.checkpoint, "prompts": args.prompts, "n_prompts": len(prompts),
                   "turns": args.turns, "max_new_tokens": args.max_new_tokens, "methods": args.methods,
                   "peers": peers, "precisions": args.precisions, "temperatures": args.temperatures,
                   "top_k": args.top_k, "top_p": args.top_p, "compile": args.compile,
                   "compile_prefill": args.compile_prefill, "seed": args.seed,
                   "warmup": args.warmup, "draft": args.draft, "draft_checkpoint": args.draft_checkpoint,
                   "tree_depth": args.tree_depth, "tree_topk": args.tree_topk, "tree_tokens": args.tree_tokens,
                   "draft_vocab": args.draft_vocab, "draft_quant": args.draft_quant,
                   "lookup_branch": args.lookup_branch, "random_model": args.random_model},
        "roofline": roofline,
        "wall_s": round(time.perf_counter() - t_start, 1),     # the whole run: loading, compiling, every prompt
        "summary": summary,
        "records": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    write_plot(summary, out / "results.png")
    print(markdown_table(summary))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}", file=sys.stderr)
    if args.readme:
        import readme_perf
        readme_perf.main(["--results", str(out / "results.json"), "--readme", args.readme])


if __name__ == "__main__":
    run_cli(main)
