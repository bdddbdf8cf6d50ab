import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# Two cores: let each test process use them, but never oversubscribe with inter-op threads.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
