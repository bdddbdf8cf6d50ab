"""Train an EAGLE draft head for a target checkpoint, in two resumable stages.

    prepare  dialogues → the target's chat template → target forward (bf16, no grad) → safetensors shards
             of token ids, the target's final normed hidden states and an assistant-only loss mask.
             With --regenerate the target writes the answers itself (greedy by default): a small target's
             own answers are what the draft must predict at decode time, so this raises acceptance a lot.
    train    the EAGLE-1 objective (eagle_draft.eagle_loss) with AdamW, warm-up + cosine decay, gradient
             clipping, bf16 autocast; atomic checkpoints with optimizer + RNG state, so an interrupted run
             resumes exactly; held-out top-1 accuracy and simulated chain-5 τ per epoch; the result is a
             draft file in eagle_draft's format (only the draft's own weights).

    python scripts/train_eagle.py prepare --checkpoint checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth \\
        --out data/smollm2_regen --regenerate --max-conversations 3072 --max-len 512 --batch-size 64 --shard-size 256
    python scripts/train_eagle.py train --checkpoint checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/model.pth \\
        --data data/smollm2_regen --out runs/smollm2 --steps 2400 --lr 1e-3 --draft-vocab 12288 --unroll 2
(the shipped SmolLM2 draft; README.md has the whole recipe)

Both stages can be interrupted and rerun with the same command: `prepare` skips finished shards,
`train` continues from RUN_DIR/state.pth.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import UserError, atomic_save, atomic_write_text, load_model, run_cli  # noqa: E402

DATA_VERSION = 1
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "system": "system"}


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# ---------------------------------------------------------------------------------------------- sources

def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


def mt_bench_first_turns() -> set:
    """Normalised MT-bench first-turn questions: the benchmark we report τ on must not be trained on."""
    import assets
    out = set()
    with open(assets.fetch("mt_bench")) as f:
        for line in f:
            if line.strip():
                out.add(_norm_text(json.loads(line)["turns"][0]))
    return out


def iter_json_records(path: Path, stats: dict):
    """Records of a JSON array read one at a time with raw_decode: the ShareGPT file is cut off mid-record,
    so json.load would reject all of it; we keep every complete record and report the cut."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        raise UserError(f"{path} is not a JSON array of conversations")
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            stats["truncated_tail"] = stats.get("truncated_tail", 0) + 1
            return
        yield rec


def iter_jsonl_records(path: Path, stats: dict):
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                stats["malformed"] = stats.get("malformed", 0) + 1
                log(f"warning: {path}:{lineno}: malformed JSON record skipped ({e.msg})")


def normalise_conversation(rec):
    """A record → [{"role", "content"}] starting with user (after an optional system turn), alternating,
    ending with an assistant turn; None if it is not a usable dialogue."""
    conv = rec.get("conversations", rec.get("messages")) if isinstance(rec, dict) else None
    if not isinstance(conv, list):
        return None
    msgs = []
    for turn in conv:
        if not isinstance(turn, dict):
            return None
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str):
            return None
        if role == "system":
            if msgs:
                return None
            msgs.append({"role": role, "content": content})
            continue
        want = "user" if not msgs or msgs[-1]["role"] != "user" else "assistant"
        if role != want:
            # ShareGPT has runs like human,human: drop the dialogue rather than guess
            return None
        msgs.append({"role": role, "content": content})
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    if not any(m["role"] == "assistant" for m in msgs) or any(not m["content"].strip() for m in msgs
                                                              if m["role"] != "system"):
        return None
    return msgs


def iter_conversations(source: str, stats: dict):
    """Yields normalised dialogues from `sharegpt` or a .jsonl/.json file; counts what it skips.
    `mt_bench` yields the benchmark's first-turn questions alone: evaluation prompts, never training data."""
    if source == "mt_bench":
        import assets
        with open(assets.fetch("mt_bench")) as f:
            for line in f:
                if line.strip():
                    stats["records"] = stats.get("records", 0) + 1
                    yield [{"role": "user", "content": json.loads(line)["turns"][0]}]
        return
    if source == "sharegpt":
        import assets
        path, records = Path(assets.fetch("sharegpt")), None
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"data file not found: {path}")
        if path.stat().st_size == 0:
            raise UserError(f"data file {path} is empty")
    if path.suffix == ".jsonl":
        records = iter_jsonl_records(path, stats)
    else:
        records = iter_json_records(path, stats)
    banned = mt_bench_first_turns()
    for rec in records:
        stats["records"] = stats.get("records", 0) + 1
        msgs = normalise_conversation(rec)
        if msgs is None:
            stats["malformed"] = stats.get("malformed", 0) + 1
            continue
        first_user = next(m["content"] for m in msgs if m["role"] == "user")
        if _norm_text(first_user) in banned:
            stats["mt_bench_filtered"] = stats.get("mt_bench_filtered", 0) + 1
            continue
        yield msgs


# ---------------------------------------------------------------------------------------------- tokens

def encode_dialogue(tok, msgs, max_len: int, stop_ids=()):
    """Token ids and the assistant mask of a dialogue under the chat template.

    The template is applied to growing prefixes: the tokens an assistant turn adds after the prefix that
    ends with the generation prompt are that turn, up to and including its end-of-turn token (what the
    template puts after it, e.g. ChatML's newline, is never generated, so it is not trained on).
    Dialogues longer than max_len are cut at a turn boundary; None if not even the first answer fits.
    """
    stops = set(stop_ids)
    ids, mask = [], []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt = list(tok.encode_chat(msgs[:k], add_generation_prompt=True))
        full = list(tok.encode_chat(msgs[:k + 1], add_generation_prompt=False))
        if full[:len(prompt)] != prompt or full[:len(ids)] != ids:
            raise UserError("the chat template does not render a dialogue as a prefix of its continuation; "
                            "cannot locate assistant turns")
        if len(full) > max_len:
            break
        answer = full[len(prompt):]
        end = max((i + 1 for i, t in enumerate(answer) if t in stops), default=len(answer))
        mask += [0] * (len(prompt) - len(ids)) + [1] * end + [0] * (len(answer) - end)
        ids = full
    return (ids, mask) if ids else None


# ---------------------------------------------------------------------------------------------- target

def target_fingerprint(model) -> str:
    """Identifies a target by config and a sample of its weights: data made with one target must not
    train a draft for another (same architecture, different weights included)."""
    h = hashlib.sha256(json.dumps(model.checkpoint_meta["config"], sort_keys=True, default=str).encode())
    for t in (model.norm.weight, model.tok_embeddings.weight[:8], model.layers[0].attention.wqkv.weight[:8]):
        # rounded to bf16 so the same target loaded in bf16 (prepare) or fp32 (train) hashes the same
        h.update(t.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def causal_only(model, max_len: int, device) -> None:
    """Prepare the target for full-sequence passes without a KV cache: `setup_caches` builds the RoPE
    table and causal mask, then the (unneeded) caches are dropped so attention sees only the T tokens."""
    model.setup_caches(1, max_len)
    for layer in model.layers:
        layer.attention.kv_cache = None


@torch.no_grad()
def target_features(model, batch_ids, device) -> list:
    """Final normed hidden states for a batch of token lists (right-padded, causal, no cache)."""
    T = max(len(x) for x in batch_ids)
    idx = torch.zeros(len(batch_ids), T, dtype=torch.long)
    for i, x in enumerate(batch_ids):
        idx[i, :len(x)] = torch.tensor(x)
    pos = torch.arange(T, device=device)
    mask = model.causal_mask[:T, :T][None, None]
    h = model.hidden(idx.to(device), pos, mask=mask)
    return [h[i, :len(x)].to(torch.bfloat16).cpu() for i, x in enumerate(batch_ids)]


@torch.no_grad()
def generate_batch(model, prompts, max_new: int, stop_ids, temperature: float, device, generator=None):
    """Batched generation over left-padded prompts that also returns every fed token's feature, so the
    self-distilled data costs one pass of the target, not a generation plus a second forward.

    Each row gets its own RoPE positions (slot − pad) and a mask that hides its pad slots; pad queries
    attend to themselves only, so no row of the attention is empty (an all-masked row gives NaN, which
    would leak through 0·NaN into later layers). Returns [(ids, features [T, D])] per prompt: the prompt,
    the answer up to and including the stop token (a row cut at max_new loses its last, unfed token).
    """
    from speculative import sample
    B = len(prompts)
    P = max(len(p) for p in prompts)
    S = P + max_new
    model.setup_caches(B, S)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    idx = torch.zeros(B, P, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p, device=device)
    slots = torch.arange(S, device=device)
    valid = slots[None, :] >= pad[:, None]                                   # [B, S]
    pmask = model.causal_mask[:P][None] & valid[:, None, :]                 # [B, P, S]
    is_pad = ~valid[:, :P]
    pmask[:, torch.arange(P), torch.arange(P)] |= is_pad
    ppos = (slots[None, :P] - pad[:, None]).clamp_min(0)
    logits, h = model(idx, slots[:P], mask=pmask[:, None], pos=ppos, return_hidden=True)
    feats = [h[i, P - len(p):].to(torch.bfloat16).cpu() for i, p in enumerate(prompts)]
    out_ids = [list(p) for p in prompts]
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cur = sample(logits[:, -1], temperature) if temperature > 0 else logits[:, -1].argmax(-1)
    steps_h, steps_tok, steps_live = [], [], []
    for j in range(max_new):
        live = ~done
        steps_tok.append(cur)
        steps_live.append(live)
        if j == max_new - 1:
            break
        s = P + j
        m = (valid & (slots[None, :] <= s))[:, None, None, :s + 1]
        logits, h = model(cur[:, None], slots[s:s + 1], mask=m, pos=(s - pad)[:, None], return_hidden=True)
        steps_h.append(h[:, 0])
        done = done | torch.isin(cur, stop)
        if bool(done.all()):
            break
        nxt = logits[:, -1]
        cur = sample(nxt, temperature) if temperature > 0 else nxt.argmax(-1)
    toks = torch.stack(steps_tok, 1).cpu()
    live = torch.stack(steps_live, 1).cpu()
    hs = torch.stack(steps_h, 1).to(torch.bfloat16).cpu() if steps_h else None
    res = []
    for i in range(B):
        n = int(live[i].sum())                       # tokens generated for row i (incl. its stop token)
        n = min(n, 0 if hs is None else hs.shape[1])  # keep only tokens that were fed (have a feature)
        ids = out_ids[i] + toks[i, :n].tolist()
        f = torch.cat([feats[i], hs[i, :n]]) if n else feats[i]
        res.append((ids, f))
    return res


# ---------------------------------------------------------------------------------------------- prepare

def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _write_shard(path: Path, seqs, metadata: dict) -> None:
    from safetensors.torch import save_file
    from eagle_draft import pack_sequences
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(pack_sequences(seqs), tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prepare(args) -> None:
    device = args.device
    if args.max_len is not None and args.max_len < 16:
        raise UserError(f"--max-len {args.max_len} is too small")
    if args.shard_size < 1 or args.batch_size < 1:
        raise UserError("--shard-size and --batch-size must be ≥ 1")
    if args.source == "mt_bench" and not args.regenerate:
        raise UserError("--source mt_bench has questions only: add --regenerate (the result is evaluation "
                        "data for `train --eval-data`, never training data)")
    ckpt = Path(args.checkpoint)
    model = load_model(ckpt, device=device, dtype=torch.bfloat16)
    if args.max_len is None:
        args.max_len = min(1024, model.args.max_position_embeddings)
    if args.max_len > model.args.max_position_embeddings:
        raise UserError(f"--max-len {args.max_len} exceeds the target's context "
                        f"({model.args.max_position_embeddings})")
    from tokenizer import load_tokenizer
    tok = load_tokenizer(ckpt.parent)
    stop_ids = sorted(set(getattr(tok, "stop_ids", None) or []) | set(model.args.eos_token_ids))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"version": DATA_VERSION, "target": target_fingerprint(model), "source": args.source,
                "max_len": args.max_len, "shard_size": args.shard_size, "regenerate": bool(args.regenerate),
                "max_new_tokens": args.max_new_tokens if args.regenerate else None,
                "temperature": args.temperature if args.regenerate else None, "seed": args.seed}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = [k for k in settings if old.get("settings", {}).get(k) != settings[k]]
        if diff:
            raise UserError(f"{out} holds data prepared with different {', '.join(diff)} "
                            f"(use another --out, or delete {out} to start over)")
    meta = {"settings": settings, "checkpoint": str(ckpt), "dim": model.args.dim,
            "vocab_size": model.args.vocab_size, "stop_ids": stop_ids, "complete": False}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))

    stats: dict = {}
    shard_meta = {"target": settings["target"], "version": DATA_VERSION}
    conversations = iter_conversations(args.source, stats)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if not args.regenerate:
        causal_only(model, args.max_len, device)
    limit = args.max_conversations
    max_prompt = args.max_len - args.max_new_tokens
    if args.regenerate and max_prompt < 8:
        raise UserError(f"--max-len {args.max_len} leaves no room for prompts with --max-new-tokens "
                        f"{args.max_new_tokens}")

    def next_items():
        """The next shard's worth of (ids, mask) (dialogue mode) or prompt ids (regenerate mode)."""
        items = []
        for msgs in conversations:
            if args.regenerate:
                first = [m for m in msgs[:2] if m["role"] == "system"] + \
                        [next(m for m in msgs if m["role"] == "user")]
                ids = list(tok.encode_chat(first, add_generation_prompt=True))
                if len(ids) > max_prompt:
                    stats["too_long"] = stats.get("too_long", 0) + 1
                    continue
                items.append(ids)
            else:
                enc = encode_dialogue(tok, msgs, args.max_len, stop_ids)
                if enc is None:
                    stats["too_long"] = stats.get("too_long", 0) + 1
                    continue
                items.append(enc)
            if len(items) == args.shard_size:
                break
        return items

    n_done = n_tokens = 0
    shard = 0
    total = limit if limit else None
    bar = tqdm(total=total, unit="conv", desc="prepare", dynamic_ncols=True)
    while limit is None or n_done < limit:
        items = next_items()
        if limit is not None:
            items = items[:limit - n_done]
        if not items:
            break
        path = out / _shard_name(shard)
        if path.exists():
            bar.update(len(items))
            n_done += len(items)
            shard += 1
            continue
        order = sorted(range(len(items)), key=lambda i: len(items[i] if args.regenerate else items[i][0]))
        seqs = [None] * len(items)
        for b in range(0, len(order), args.batch_size):
            chunk = order[b:b + args.batch_size]
            if args.regenerate:
                res = generate_batch(model, [items[i] for i in chunk], args.max_new_tokens, stop_ids,
                                     args.temperature, device, gen)
                for i, (ids, f) in zip(chunk, res):
                    m = [0] * len(items[i]) + [1] * (len(ids) - len(items[i]))
                    seqs[i] = (ids, f, m)
            else:
                feats = target_features(model, [items[i][0] for i in chunk], device)
                for i, f in zip(chunk, feats):
                    seqs[i] = (items[i][0], f, items[i][1])
            bar.update(len(chunk))
            n_tokens += sum(len(seqs[i][0]) for i in chunk)
            bar.set_postfix(tokens=n_tokens)
        seqs = [s for s in seqs if sum(s[2]) > 0]
        _write_shard(path, seqs, shard_meta)
        n_done += len(items)
        shard += 1
    bar.close()
    if shard == 0:
        raise UserError(f"no usable conversations in {args.source} ({_stats_line(stats)})")
    meta["complete"] = True
    meta["shards"] = shard
    meta["stats"] = stats
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    log(f"prepared {shard} shard(s), {n_done} conversations in {out} ({_stats_line(stats)})")


def _stats_line(stats: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(stats.items())) or "nothing read"


# ---------------------------------------------------------------------------------------------- train

def load_data(data_dir: Path, fingerprint: str):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from eagle_draft import unpack_sequences
    meta_path = data_dir / "meta.json"
    if not meta_path.exists():
        raise UserError(f"{data_dir} has no meta.json (run `train_eagle.py prepare --out {data_dir}` first)")
    meta = json.loads(meta_path.read_text())
    if meta["settings"]["target"] != fingerprint:
        raise UserError(f"{data_dir} was prepared with a different target ({meta.get('checkpoint')}); "
                        f"prepare data with this --checkpoint")
    shards = sorted(data_dir.glob("shard-*.safetensors"))
    if not shards:
        raise UserError(f"{data_dir} has no shards (run prepare)")
    if not meta.get("complete"):
        log(f"warning: {data_dir}: prepare did not finish; training on the {len(shards)} finished shard(s)")
    seqs = []
    for p in shards:
        try:
            seqs += unpack_sequences(load_file(str(p)))
        except (SafetensorError, ValueError, OSError) as e:
            raise UserError(f"cannot read shard {p}: {e} (delete it and rerun prepare)")
    return meta, seqs


def epoch_batches(lengths, batch_size: int, seed: int) -> list:
    """One epoch's batches (lists of sequence indices): shuffled, then sorted by length within windows
    of 32 batches so a batch pads little, then the batches shuffled again. A pure function of the seed,
    so a resumed run sees the same batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 32 * batch_size
    batches = []
    for a in range(0, len(order), window):
        chunk = sorted(order[a:a + window], key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _rng_state(gen):
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "noise": gen.get_state()}


def evaluate(draft, target_head, seqs, device, depth: int, positions: int, seed: int, autocast,
             window=None) -> dict:
    """Held-out metrics: top-1 agreement of the draft's next token with the target's argmax (all trained
    positions), and simulated τ of a depth-`depth` greedy chain from `positions` assistant positions per
    sequence (eagle_draft.chain_acceptance)."""
    from eagle_draft import chain_acceptance, pad_batch
    draft.eval()
    rng = random.Random(seed)
    hit = tot = 0.0
    acc_list = []
    with torch.no_grad(), autocast():
        for t, h, m in seqs:
            f, x, mk = pad_batch([(t, h, m)], device)
            f = f.float()
            pred = draft(f[:, :-1], x[:, 1:])
            y = draft.logits(pred).argmax(-1)
            if getattr(draft, "d2t", None) is not None:
                y = draft.d2t[y]
            g = target_head(f[:, 1:]).argmax(-1)
            w = mk[:, 1:]
            hit += float(((y == g) & w).sum())
            tot += float(w.sum())
            cand = [i for i in range(len(t) - 2) if bool(m[i + 1])]
            if cand:
                starts = sorted(rng.sample(cand, min(positions, len(cand))))
                acc_list.append(chain_acceptance(draft, target_head, f[0], x[0], starts, depth,
                                                 window).float())
    draft.train()
    accepted = torch.cat(acc_list) if acc_list else torch.zeros(1)
    return {"top1": hit / max(tot, 1.0), "tau": 1.0 + float(accepted.mean()),
            "accept_k": [float((accepted >= k).float().mean()) for k in range(1, depth + 1)]}


def train(args) -> None:
    from eagle_draft import EagleDraft, draft_vocab_from_counts, eagle_loss, pad_batch, save_draft
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    for name in ("steps", "epochs", "batch_size", "save_every", "unroll"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1")
    target = load_model(args.checkpoint, device=device, dtype=torch.float32)
    for p in target.parameters():
        p.requires_grad_(False)
    fp = target_fingerprint(target)
    seqs, stop_ids = [], set()
    for d in args.data:
        meta, part = load_data(Path(d), fp)
        if meta["settings"]["source"] == "mt_bench":
            raise UserError(f"{d} holds MT-bench prompts: evaluation data, pass it as --eval-data")
        if meta["dim"] != target.args.dim:
            raise UserError(f"{d} holds {meta['dim']}-dim features but the target has dim {target.args.dim}")
        seqs += part
        stop_ids |= set(meta.get("stop_ids", []))
    seqs = [s for s in seqs if len(s[0]) >= 3]
    rng = random.Random(args.seed)
    order = list(range(len(seqs)))
    rng.shuffle(order)
    n_hold = min(args.holdout, max(1, len(seqs) // 10)) if len(seqs) > 1 else 0
    if args.eval_data:
        # a separate evaluation set (e.g. the target's own answers to MT-bench): all data trains
        n_hold = 0
        held = []
        for d in args.eval_data:
            held += [s for s in load_data(Path(d), fp)[1] if len(s[0]) >= 3]
    else:
        held = [seqs[i] for i in order[:n_hold]]
    train_seqs = [seqs[i] for i in order[n_hold:]]
    if not train_seqs:
        raise UserError(f"{args.data} holds too few sequences to train on ({len(seqs)})")

    init = None
    if args.init:
        # fine-tune an existing draft: its weights and its draft vocabulary carry over
        from checkpoint import read_checkpoint
        from eagle_draft import check_fits
        ck = read_checkpoint(args.init, "eagle_draft")
        check_fits(ck.get("config") or {}, target.args, args.init)
        init = {k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    d2t = init.get("d2t") if init else None
    if init is not None and args.draft_vocab:
        # fine-tuning on fewer tokens: its vocabulary is frequency-ranked, keep the most frequent N
        if d2t is None or args.draft_vocab > d2t.numel():
            raise UserError(f"--draft-vocab {args.draft_vocab} with --init: the draft's vocabulary "
                            f"({'the whole target vocabulary' if d2t is None else d2t.numel()}) can only be cut")
        d2t = d2t[:args.draft_vocab].clone()
        init["d2t"] = d2t
    if args.draft_vocab and init is None:
        counts = torch.zeros(target.args.vocab_size, dtype=torch.long)
        for t, _, m in train_seqs:
            counts += torch.bincount(t[m], minlength=target.args.vocab_size)
        d2t = draft_vocab_from_counts(counts, args.draft_vocab, sorted(stop_ids))
        cover = float(counts[d2t].sum()) / max(1, int(counts.sum()))
        log(f"draft vocabulary: {len(d2t)} ids cover {cover:.1%} of assistant tokens")

    torch.manual_seed(args.seed)
    draft = EagleDraft(target.args, draft_vocab=d2t).to(device)
    if init:
        draft.load_state_dict(init, strict=True)
    draft.bind_target(target)
    params = [p for n, p in draft.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_seqs) / args.batch_size)
    total = args.steps or steps_per_epoch * (args.epochs or 1)
    warmup = max(1, min(args.warmup, total // 10 or 1))
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pth"
    step, history = 0, []
    config = {"data": [str(d) for d in args.data], "init": args.init, "checkpoint": str(args.checkpoint), "target": fp,
              "draft_vocab": args.draft_vocab, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "total_steps": total, "w_cls": args.w_cls, "noise": args.noise, "n_train": len(train_seqs),
              "unroll": args.unroll}
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        changed = [k for k in config if st["config"].get(k) != config[k]]
        if changed:
            raise UserError(f"{run} holds a run with different {', '.join(changed)} "
                            f"(use another --out, or delete {state_path} to start over)")
        draft.load_state_dict(st["draft"], strict=False)
        opt.load_state_dict(st["optimizer"])
        step, history = st["step"], st["history"]
        torch.set_rng_state(st["rng"]["torch"])
        random.setstate(st["rng"]["python"])
        noise_gen.set_state(st["rng"]["noise"])
        log(f"resuming {run} at step {step}/{total}")

    def own_state():
        # only the draft's own weights: the target's embedding and head are shared, never copied
        shared = {id(target.tok_embeddings.weight), id(target.output.weight)}
        return {n: p.detach().cpu().clone() for n, p in draft.state_dict(keep_vars=True).items()
                if id(p) not in shared}

    def save_state():
        atomic_save({"step": step, "draft": own_state(), "optimizer": opt.state_dict(), "history": history,
                     "rng": _rng_state(noise_gen), "config": config}, state_path)

    dev_type = "cuda" if device.startswith("cuda") else "cpu"

    def autocast():
        return torch.autocast(dev_type, dtype=torch.bfloat16, enabled=not args.fp32)

    def target_head(f):
        return target.output(f)

    def eval_and_log(tag):
        if not held:
            return
        t0 = time.time()
        mtr = evaluate(draft, target_head, held, device, args.depth, args.eval_positions, args.seed, autocast,
                       args.eval_window)
        mtr.update(step=step, tag=tag, eval_s=round(time.time() - t0, 1))
        history.append(mtr)
        log(f"[{tag}] step {step}: held-out top-1 {mtr['top1']:.3f}  simulated τ(chain {args.depth}) "
            f"{mtr['tau']:.2f}  P(accept ≥k) " + " ".join(f"{a:.2f}" for a in mtr["accept_k"]))

    draft.train()
    if step == 0 and not args.no_initial_eval:
        eval_and_log("untrained")
    bar = tqdm(total=total, initial=step, unit="step", desc="train", dynamic_ncols=True)
    t_start, ema = time.time(), None
    stop_at = min(total, step + args.stop_after) if args.stop_after else total
    batches = None
    while step < stop_at:
        epoch, k = divmod(step, steps_per_epoch)
        if k == 0 or batches is None or batches[0] != epoch:
            batches = (epoch, epoch_batches([len(s[0]) for s in train_seqs], args.batch_size,
                                            args.seed * 1000 + epoch))
        batch = [train_seqs[i] for i in batches[1][k]]
        f, x, m = pad_batch(batch, device)
        f = f.float()   # stored in bf16; autocast (or --fp32) decides the compute dtype
        lr = lr_at(step, total, warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast():
            loss, parts = eagle_loss(draft, f, x, m, noise=args.noise, w_cls=args.w_cls, generator=noise_gen,
                                     unroll=args.unroll)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == total:
            vals = {"loss": float(loss.detach()), "reg": float(parts["reg"]), "cls": float(parts["cls"]),
                    "acc": float(parts["acc"])}
            ema = vals if ema is None else {kk: 0.9 * ema[kk] + 0.1 * vals[kk] for kk in vals}
            bar.set_postfix(loss=f"{ema['loss']:.3f}", acc=f"{ema['acc']:.3f}", lr=f"{lr:.1e}",
                            gn=f"{float(gnorm):.2f}")
            history.append({"step": step, "tag": "train", **vals, "lr": lr})
        bar.update(1)
        end_epoch = step % steps_per_epoch == 0
        if end_epoch or step == total:
            eval_and_log(f"epoch {math.ceil(step / steps_per_epoch)}" if end_epoch else "final")
        if step % args.save_every == 0 or step == stop_at:
            save_state()
    bar.close()
    if step < total:
        log(f"stopped at step {step}/{total}; rerun the same command to continue")
        return
    out_path = Path(args.draft_out) if args.draft_out else run / "draft.pth"
    # bf16 halves the shipped file; generate.py runs the draft in bf16 anyway
    final = copy.deepcopy(draft).to(torch.bfloat16) if args.save_dtype == "bf16" else draft
    save_draft(final, out_path, target.checkpoint_meta["config"])
    summary = {"draft": str(out_path), "steps": step, "train_sequences": len(train_seqs),
               "train_tokens": int(sum(int(m.sum()) for _, _, m in train_seqs)),
               "heldout_sequences": len(held), "wall_s_this_run": round(time.time() - t_start, 1),
               "final": next((h for h in reversed(history) if "tau" in h), None),
               "untrained": next((h for h in history if h.get("tag") == "untrained"), None), "config": config}
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=1))
    log(f"wrote {out_path}")


# ---------------------------------------------------------------------------------------------- CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="dialogues → target features (safetensors shards)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--source", default="sharegpt", help="sharegpt, a .jsonl/.json file of conversations, or "
                   "mt_bench (its first-turn questions, with --regenerate: evaluation data only)")
    p.add_argument("--max-conversations", type=int, default=None)
    p.add_argument("--max-len", type=int, default=None, help="tokens per dialogue (default 1024, or the "
                   "target's context if smaller); longer dialogues are cut at a turn boundary")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256, help="conversations per shard (the resume unit)")
    p.add_argument("--regenerate", action="store_true", help="the target writes the answers (first turn)")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)")
    t = sub.add_parser("train", help="train a draft on prepared data")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--data", required=True, nargs="+", help="one or more prepared data directories")
    t.add_argument("--out", required=True)
    t.add_argument("--draft-out", default=None, help="where the final draft goes (default RUN_DIR/draft.pth)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--w-cls", type=float, default=0.1)
    t.add_argument("--noise", type=float, default=0.2)
    t.add_argument("--unroll", type=int, default=1,
                   help="also train depth 2..N on the draft's own guesses (training-time test; 1 = EAGLE-1)")
    t.add_argument("--draft-vocab", type=int, default=None,
                   help="draft vocabulary: the N most frequent assistant tokens (+ stop ids)")
    t.add_argument("--init", default=None, help="start from this draft file (fine-tuning; keeps its vocabulary, or its "
                   "--draft-vocab most frequent tokens)")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--clip", type=float, default=0.5)
    t.add_argument("--holdout", type=int, default=64, help="held-out sequences for the metrics")
    t.add_argument("--eval-data", nargs="+", default=None,
                   help="prepared directories to measure on instead of a held-out split (e.g. "
                        "`prepare --source mt_bench --regenerate`)")
    t.add_argument("--eval-positions", type=int, default=16, help="chain starts per held-out sequence")
    t.add_argument("--depth", type=int, default=5)
    t.add_argument("--eval-window", type=int, default=256,
                   help="context the simulated chain sees before each start (0: all; bounds eval cost)")
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--log-every", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    t.add_argument("--no-initial-eval", action="store_true")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop this invocation after N steps (rerun the same command to continue)")
    t.add_argument("--save-dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the final draft")
    t.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)")
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.cmd == "prepare":
        if args.max_conversations is not None and args.max_conversations < 1:
            raise UserError("--max-conversations must be ≥ 1")
        prepare(args)
    else:
        if args.steps and args.epochs:
            raise UserError("give --steps or --epochs, not both")
        train(args)


if __name__ == "__main__":
    run_cli(main)
