"""scripts/train_eagle.py on a tiny random target with a tiny byte-level BPE tokenizer (ChatML template).

What must hold: prepare + a few hundred training steps lower the loss and raise measured acceptance
over the untrained draft; an interrupted run resumes to exactly the uninterrupted result; bad data is
reported and skipped or refused, never leaving a corrupt shard behind.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import train_eagle  # noqa: E402
from eagle_draft import load_draft, unpack_sequences  # noqa: E402
from tiny import tiny_config, write_checkpoint  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in green trees near blue water "
         "what is two plus two please explain why the sky is blue tell me a short story about a red fox").split()


def write_tokenizer(directory: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                           "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}))
    assert tk.token_to_id("<|im_end|>") == 2   # the tiny config's eos_token_id


def make_target(directory: Path, seed=0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(vocab_size=384, max_position_embeddings=512)
    write_checkpoint(directory / "model.pth", cfg, seed=seed)
    write_tokenizer(directory, 330)
    return directory / "model.pth"


def dialogues(n, seed=0, turns=1):
    import random
    r = random.Random(seed)
    out = []
    for i in range(n):
        conv = []
        for _ in range(turns):
            conv.append({"from": "human", "value": " ".join(r.choice(WORDS) for _ in range(r.randint(3, 10)))})
            conv.append({"from": "gpt", "value": " ".join(r.choice(WORDS) for _ in range(r.randint(5, 20)))})
        out.append({"id": str(i), "conversations": conv})
    return out


def write_jsonl(path: Path, records, extra_lines=()):
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def cli(*argv):
    """Run the CLI in-process as a user would: UserError → one line on stderr + exit code 2."""
    from checkpoint import run_cli
    return run_cli(lambda: train_eagle.main([str(a) for a in argv]))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    torch.set_num_threads(1)   # the tiny model is launch-bound; extra threads only contend
    return make_target(tmp_path_factory.mktemp("target"))


def shards(d: Path):
    return sorted(Path(d).glob("shard-*.safetensors"))


def read_all(d: Path):
    from safetensors.torch import load_file
    seqs = []
    for p in shards(d):
        seqs += unpack_sequences(load_file(str(p)))
    return seqs


def test_prepare_dialogues_masks_assistant_turns_and_filters(target, tmp_path):
    from tokenizer import load_tokenizer
    mt = json.loads(open(__import__("assets").fetch("mt_bench")).readline())["turns"][0]
    recs = dialogues(10, turns=2)
    recs.append({"conversations": [{"from": "human", "value": mt}, {"from": "gpt", "value": "an answer"}]})
    recs.append({"conversations": [{"from": "human", "value": "hi " * 400}, {"from": "gpt", "value": "x"}]})
    recs.append({"conversations": "not a list"})
    src = write_jsonl(tmp_path / "d.jsonl", recs, extra_lines=['{"conversations": [ broken'])
    cli("prepare", "--checkpoint", target, "--out", tmp_path / "data", "--source", src, "--max-len", 256,
        "--shard-size", 4, "--batch-size", 3)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["complete"] and meta["shards"] == 3
    st = meta["stats"]
    assert st["mt_bench_filtered"] == 1 and st["too_long"] == 1 and st["malformed"] == 2
    seqs = read_all(tmp_path / "data")
    assert len(seqs) == 10
    tok = load_tokenizer(target.parent)
    t, h, m = seqs[0]
    assert h.dtype == torch.bfloat16 and h.shape == (len(t), 64)
    # the masked tokens are exactly the assistant answers, each closed by its end-of-turn token
    text = tok.decode(t[m].tolist())
    assert text == "".join(turn["value"] + "<|im_end|>" for turn in recs[0]["conversations"][1::2])
    # the stored features are the target's own (bf16) final normed hidden states
    from checkpoint import load_model
    model = load_model(target, dtype=torch.float32)
    train_eagle.causal_only(model, 256, "cpu")
    ref = train_eagle.target_features(model, [t.tolist()], "cpu")[0]
    torch.testing.assert_close(h.float(), ref.float(), atol=0.05, rtol=0.02)


def test_bad_inputs_are_refused_with_one_line(target, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        cli("prepare", "--checkpoint", target, "--out", tmp_path / "d1", "--source", empty)
    assert e.value.code == 2 and "empty" in capsys.readouterr().err
    assert not shards(tmp_path / "d1")

    junk = write_jsonl(tmp_path / "junk.jsonl", [{"conversations": [{"from": "gpt", "value": "no question"}]}],
                       extra_lines=["{nope"])
    with pytest.raises(SystemExit) as e:
        cli("prepare", "--checkpoint", target, "--out", tmp_path / "d2", "--source", junk)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no usable conversations" in err and "malformed=2" in err

    with pytest.raises(SystemExit) as e:
        cli("prepare", "--checkpoint", tmp_path / "missing.pth", "--out", tmp_path / "d3", "--source", junk)
    assert e.value.code == 2 and "checkpoint not found" in capsys.readouterr().err

    # data made with one target must not train a draft for another of the same shape
    src = write_jsonl(tmp_path / "ok.jsonl", dialogues(6))
    cli("prepare", "--checkpoint", target, "--out", tmp_path / "d4", "--source", src, "--max-len", 128)
    other = make_target(tmp_path / "other", seed=1)
    with pytest.raises(SystemExit) as e:
        cli("train", "--checkpoint", other, "--data", tmp_path / "d4", "--out", tmp_path / "run", "--steps", 2)
    assert e.value.code == 2 and "different target" in capsys.readouterr().err
    # nor may a rerun mix settings into an existing data directory
    with pytest.raises(SystemExit) as e:
        cli("prepare", "--checkpoint", target, "--out", tmp_path / "d4", "--source", src, "--max-len", 64)
    assert e.value.code == 2 and "max_len" in capsys.readouterr().err


def test_prepare_resumes_and_never_leaves_a_corrupt_shard(target, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", dialogues(9, seed=3))
    args = ("prepare", "--checkpoint", target, "--out", tmp_path / "data", "--source", src, "--max-len", 128,
            "--shard-size", 3)
    import safetensors.torch as st
    real_save, calls = st.save_file, []

    def dying_save(tensors, filename, metadata=None):   # the machine dies while shard 1 is being written
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(SystemExit):
        cli(*args)
    monkeypatch.setattr(st, "save_file", real_save)
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert files == ["meta.json", "shard-00000.safetensors"]      # no half-written file under any name
    first = shards(tmp_path / "data")[0].stat().st_mtime_ns
    cli(*args)
    assert shards(tmp_path / "data")[0].stat().st_mtime_ns == first   # finished shards are not redone
    assert len(shards(tmp_path / "data")) == 3 and len(read_all(tmp_path / "data")) == 9


@pytest.fixture(scope="module")
def regen_data(target, tmp_path_factory):
    d = tmp_path_factory.mktemp("regen")
    src = write_jsonl(d / "prompts.jsonl", dialogues(96, seed=1))
    cli("prepare", "--checkpoint", target, "--out", d / "data", "--source", src, "--regenerate",
        "--max-new-tokens", 40, "--max-len", 96, "--batch-size", 16, "--shard-size", 32)
    return d / "data"


def test_regenerate_writes_the_targets_own_greedy_answers(target, regen_data):
    from checkpoint import load_model
    seqs = read_all(regen_data)
    assert len(seqs) == 96
    model = load_model(target, dtype=torch.float32)
    train_eagle.causal_only(model, 128, "cpu")
    same = total = 0
    for t, h, m in seqs[:6]:
        assert m.any() and not m[0]
        f = train_eagle.target_features(model, [t.tolist()], "cpu")[0].float()
        greedy = model.output(f).argmax(-1)
        start = int(m.nonzero()[0])
        # each answer token is the target's greedy choice after its prefix (prepare ran in bf16, this
        # check in fp32, so allow the odd near-tie to flip)
        same += int((greedy[start - 1:len(t) - 1] == t[start:]).sum())
        total += len(t) - start
    assert same >= 0.95 * total


def train_args(target, data, out, *extra):
    return ("train", "--checkpoint", target, "--data", data, "--out", out, "--batch-size", 8, "--lr", 3e-3,
            "--warmup", 20, "--holdout", 8, "--eval-positions", 8, *extra)


def test_training_lowers_loss_and_raises_acceptance(target, regen_data, tmp_path):
    cli(*train_args(target, regen_data, tmp_path / "run", "--steps", 200, "--draft-vocab", 200,
                    "--save-every", 1000, "--log-every", 1))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    state = torch.load(tmp_path / "run" / "state.pth", weights_only=False)
    losses = [h["loss"] for h in state["history"] if h.get("tag") == "train"]
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:20]) / 20
    before, after = summary["untrained"], summary["final"]
    print("untrained", before, "trained", after, "loss", losses[:3], losses[-3:])
    assert after["top1"] > before["top1"] + 0.2, (before, after)
    assert after["tau"] > before["tau"] + 0.3, (before, after)
    # the shipped file holds only the draft's own weights, and loads for the target it was trained for
    from checkpoint import load_model
    sd = torch.load(summary["draft"], weights_only=True)["state_dict"]
    assert not any("embed" in k or "output" in k or "lm_head" in k for k in sd)
    assert sd["d2t"].numel() == 200 and 2 in sd["d2t"].tolist()
    draft = load_draft(summary["draft"], load_model(target, dtype=torch.float32), dtype=torch.float32)
    assert draft.vocab_size == 200
    # --init fine-tunes the shipped draft: training starts where it ended, with its vocabulary
    cli(*train_args(target, regen_data, tmp_path / "ft", "--steps", 2, "--init", summary["draft"]))
    ft = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert ft["untrained"]["top1"] > before["top1"] + 0.2
    assert torch.equal(torch.load(ft["draft"], weights_only=True)["state_dict"]["d2t"], sd["d2t"])
    # ... or with its most frequent tokens only (the vocabulary it was trained with is ranked by frequency)
    cli(*train_args(target, regen_data, tmp_path / "ft64", "--steps", 2, "--init", summary["draft"],
                    "--draft-vocab", 64))
    ft64 = json.loads((tmp_path / "ft64" / "summary.json").read_text())
    assert torch.equal(torch.load(ft64["draft"], weights_only=True)["state_dict"]["d2t"], sd["d2t"][:64])
    with pytest.raises(SystemExit):      # a vocabulary can be cut, not grown
        cli(*train_args(target, regen_data, tmp_path / "ft999", "--steps", 2, "--init", summary["draft"],
                        "--draft-vocab", 300))


def test_resume_reproduces_an_uninterrupted_run(target, regen_data, tmp_path):
    common = ("--steps", 30, "--save-every", 10, "--noise", 0.2, "--no-initial-eval", "--fp32", "--unroll", 2)
    cli(*train_args(target, regen_data, tmp_path / "a", *common))
    cli(*train_args(target, regen_data, tmp_path / "b", *common, "--stop-after", 10))
    assert torch.load(tmp_path / "b" / "state.pth", weights_only=False)["step"] == 10
    assert not (tmp_path / "b" / "draft.pth").exists()
    cli(*train_args(target, regen_data, tmp_path / "b", *common))
    a = torch.load(tmp_path / "a" / "state.pth", weights_only=False)
    b = torch.load(tmp_path / "b" / "state.pth", weights_only=False)
    assert a["step"] == b["step"] == 30
    for k in a["draft"]:
        torch.testing.assert_close(a["draft"][k], b["draft"][k], atol=0, rtol=0, msg=k)
    ea, eb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(ea[i]["exp_avg"], eb[i]["exp_avg"]) for i in ea)
    # a rerun with other hyper-parameters must not silently continue this run
    with pytest.raises(SystemExit):
        cli(*train_args(target, regen_data, tmp_path / "b", "--steps", 30, "--lr", 1e-4))


def test_mt_bench_prompts_are_evaluation_data_only(target, regen_data, tmp_path, capsys):
    ev = tmp_path / "mt"
    cli("prepare", "--checkpoint", target, "--out", ev, "--source", "mt_bench", "--regenerate",
        "--max-conversations", 4, "--max-new-tokens", 8, "--max-len", 512, "--batch-size", 4)
    assert len(read_all(ev)) == 4
    with pytest.raises(SystemExit) as e:
        cli("train", "--checkpoint", target, "--data", ev, "--out", tmp_path / "r1", "--steps", 1)
    assert e.value.code == 2 and "--eval-data" in capsys.readouterr().err
    cli(*train_args(target, regen_data, tmp_path / "r2", "--steps", 2, "--eval-data", ev))
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["heldout_sequences"] == 4 and summary["train_sequences"] == 96


def test_chain_window_only_drops_far_context(target, regen_data):
    from checkpoint import load_model
    from eagle_draft import EagleDraft, chain_acceptance
    model = load_model(target, dtype=torch.float32)
    torch.manual_seed(0)
    draft = EagleDraft(model.args).bind_target(model)
    t, h, m = read_all(regen_data)[0]
    starts = list(range(1, len(t) - 2, 3))
    full = chain_acceptance(draft, model.output, h.float(), t, starts, 5)
    same = chain_acceptance(draft, model.output, h.float(), t, starts, 5, window=len(t))
    assert torch.equal(full, same)
    # a window drops context, so the (random) draft's outputs may change, but each start is still scored
    assert chain_acceptance(draft, model.output, h.float(), t, starts, 5, window=4).shape == full.shape


def test_epoch_batches_cover_every_sequence_once_and_pad_little():
    lengths = [(i * 37) % 101 + 1 for i in range(500)]
    a = train_eagle.epoch_batches(lengths, 8, seed=3)
    assert a == train_eagle.epoch_batches(lengths, 8, seed=3)          # resume sees the same batches
    assert a != train_eagle.epoch_batches(lengths, 8, seed=4)
    flat = [i for b in a for i in b]
    assert sorted(flat) == list(range(500)) and all(1 <= len(b) <= 8 for b in a)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    assert padded < 1.15 * sum(lengths)
