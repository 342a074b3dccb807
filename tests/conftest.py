import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smollm2_tokenizer_path() -> str:
    """Path of the real SmolLM2 tokenizer.json, from NANOTRONIX_SMOLLM2_TOKENIZER (set by .ci/run)."""
    path = os.environ.get("NANOTRONIX_SMOLLM2_TOKENIZER")
    if not path or not Path(path).is_file():
        pytest.skip("the real SmolLM2 tokenizer is not available: set NANOTRONIX_SMOLLM2_TOKENIZER to its "
                    "tokenizer.json (.ci/run sets it to ../shared/smollm2/tokenizer.json)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """Path of a tiny byte-level BPE tokenizer.json (<|endoftext|> = 0), trained in well under a second."""
    from test_data_support import train_tiny_tokenizer
    return str(train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.json"))
