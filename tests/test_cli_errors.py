"""Every user mistake ends with one line `error: ...` on stderr and exit code 2, no traceback.

Most cases call generate.main through checkpoint.run_cli in-process (the same code path as the script,
without paying for a Python + torch start-up per case); a few run the real script in a subprocess."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import generate
import tiny
from checkpoint import atomic_save, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("err")
    path, _, _ = tiny.write_checkpoint(d / "model.pth")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pytest.importorskip("tokenizer", reason="tokenizer.py has not landed")
    from test_generate import write_tiny_model_dir
    return write_tiny_model_dir(tmp_path_factory.mktemp("errdir"))


def fails(capsys, *argv, match):
    """Run the CLI in-process; assert exit 2 with exactly one stderr line `error: ...` containing match."""
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: generate.main(list(argv)))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert match in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("argv, match", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "hot"], "--temperature"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--num-samples", "-2"], "--num-samples must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-seq-length", "0"], "--max-seq-length must be >= 1"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--tree-tokens", "many"], "--tree-tokens must be a positive integer or 'auto'"),
    (["--lookup-branch", "-1"], "--lookup-branch must be >= 0"),
    (["--system", "x"], "--system needs --chat"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--compare-ar"], "--compare-ar compares against --speculate"),
])
def test_bad_flags(capsys, ckpt, argv, match):
    fails(capsys, "--checkpoint", str(ckpt), *argv, match=match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, ckpt):
    fails(capsys, "--checkpoint", str(ckpt), "--device", "cuda", match="no usable CUDA device")


def test_missing_checkpoint(capsys, tmp_path):
    fails(capsys, "--checkpoint", str(tmp_path / "nope" / "model.pth"), match="checkpoint not found")


def test_unknown_architecture(capsys, tmp_path):
    cfg = tiny.tiny_config(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    atomic_save({"eaglet": 1, "kind": "target", "config": cfg, "quantization": None, "state_dict": {}},
                tmp_path / "model.pth")
    fails(capsys, "--checkpoint", str(tmp_path / "model.pth"), match="unsupported model")


def test_config_that_does_not_match_weights(capsys, tmp_path, ckpt):
    sd = torch.load(ckpt, weights_only=True)
    sd["config"] = dict(sd["config"], num_hidden_layers=3)
    atomic_save(sd, tmp_path / "model.pth")
    fails(capsys, "--checkpoint", str(tmp_path / "model.pth"), match="do not match its config")


def test_not_an_eaglet_checkpoint(capsys, tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pth")
    fails(capsys, "--checkpoint", str(tmp_path / "model.pth"), match="not an eaglet checkpoint")


def test_truncated_weights(capsys, tmp_path, ckpt):
    data = open(ckpt, "rb").read()
    (tmp_path / "model.pth").write_bytes(data[: len(data) // 2])
    fails(capsys, "--checkpoint", str(tmp_path / "model.pth"), match="corrupt or truncated")


def test_prompt_longer_than_cache(capsys, tiny_dir):
    fails(capsys, "--checkpoint", str(tiny_dir / "model.pth"), "--max-seq-length", "8",
          "--prompt", "the cat sat on the mat " * 5, match="raise --max-seq-length or shorten the prompt")


def test_max_new_tokens_beyond_cache(capsys, tiny_dir):
    fails(capsys, "--checkpoint", str(tiny_dir / "model.pth"), "--max-seq-length", "64",
          "--prompt", "the cat", "--max-new-tokens", "100", match="does not fit the cache")


def test_cache_beyond_model_context(capsys, tiny_dir):
    fails(capsys, "--checkpoint", str(tiny_dir / "model.pth"), "--max-seq-length", "4096",
          match="exceeds the model's context of 512")
    fails(capsys, "--checkpoint", str(tiny_dir / "model.pth"), "--max-new-tokens", "600",
          match="exceed the model's context of 512")


def test_speculate_without_draft(capsys, tiny_dir):
    fails(capsys, "--checkpoint", str(tiny_dir / "model.pth"), "--speculate", "--max-new-tokens", "4",
          match="needs an EAGLE draft")
    fails(capsys, "--checkpoint", str(tiny_dir / "model.pth"), "--speculate", "--batch-size", "2",
          "--spec-method", "lookup", match="one sequence at a time")


@pytest.mark.parametrize("make, argv, match", [
    ("truncated", [], "corrupt or truncated"),
    ("none", [], "checkpoint not found"),
    ("good", ["--top-p", "2"], "--top-p must be in (0, 1]"),
])
def test_script_exits_2_with_one_line(tmp_path, ckpt, make, argv, match):
    path = tmp_path / "model.pth"
    if make == "truncated":
        data = open(ckpt, "rb").read()
        path.write_bytes(data[: len(data) // 3])
    elif make == "good":
        shutil.copy(ckpt, path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--checkpoint", str(path), *argv],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
    assert r.stdout == ""
