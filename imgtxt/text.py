"""Text tokenization, written once: strings -> padded token id and mask arrays, with truncation reported per text."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from imgtxt.errors import ConfigError, InvalidInput, LimitExceeded


@dataclass(frozen=True)
class TextConfig:
    """How a text becomes the text tower's input; saved in the bundle manifest and rebuilt from it."""

    tokenizer_file: str = "tokenizer.json"
    """HF `tokenizers` JSON file, relative to the bundle directory."""
    max_tokens: int = 64
    """Tokens per text, special tokens included; longer texts are truncated and flagged."""
    max_text_chars: int = 4096
    """Longest accepted text in characters (checked before tokenizing, so huge strings cost nothing)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 3:
            raise ConfigError(f"max_tokens must be >= 3 (room for special tokens), got {self.max_tokens}")
        if self.max_text_chars < 1:
            raise ConfigError(f"max_text_chars must be >= 1, got {self.max_text_chars}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        """Rebuilds the config from its manifest form."""
        return cls(**d)


@dataclass(frozen=True)
class TokenizedBatch:
    """Token arrays of a batch of texts, padded to the batch's longest text."""

    input_ids: np.ndarray
    """(N, L) int64 token ids."""
    attention_mask: np.ndarray
    """(N, L) int64, 1 on real tokens, 0 on padding."""
    truncated: list[bool]
    """Whether each text was cut at max_tokens."""
    num_tokens: list[int]
    """Tokens kept per text, special tokens included."""


class TextTokenizer:
    """Wraps a HF `tokenizers` tokenizer with the bundle's limits; thread-safe for encoding."""

    def __init__(self, tokenizer: Tokenizer, cfg: TextConfig) -> None:
        self.cfg = cfg
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=cfg.max_tokens)
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0
        # Token count of the empty string (e.g. [CLS] [SEP]): a text that encodes to no more has no content.
        self._num_special = len(self._tok.encode("").ids)

    @classmethod
    def from_file(cls, path: str | Path, cfg: TextConfig) -> TextTokenizer:
        """Loads a `tokenizer.json` file."""
        return cls(Tokenizer.from_file(str(path)), cfg)

    def validate(self, text: str) -> None:
        """Checks one text before tokenizing.

        Raises:
            InvalidInput: Empty or whitespace-only text.
            LimitExceeded: Longer than max_text_chars.
        """
        if len(text) > self.cfg.max_text_chars:
            raise LimitExceeded(
                f"text is {len(text)} characters, over the limit max_text_chars={self.cfg.max_text_chars}"
            )
        if not text.strip():
            raise InvalidInput("text is empty")

    def encode(self, texts: list[str]) -> TokenizedBatch:
        """Tokenizes texts that passed `validate`, truncating to max_tokens.

        Raises:
            InvalidInput: A text that produces no token besides the special ones (e.g. only control characters).
        """
        if not texts:
            raise InvalidInput("no texts to encode")
        encodings = self._tok.encode_batch(texts)
        lengths = [len(e.ids) for e in encodings]
        for i, n in enumerate(lengths):
            if n <= self._num_special:
                raise InvalidInput(f"text {i} has no tokens besides the special ones")
        ids = np.full((len(texts), max(lengths)), self._pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, : lengths[i]] = e.ids
            mask[i, : lengths[i]] = 1
        truncated = [bool(e.overflowing) for e in encodings]
        return TokenizedBatch(ids, mask, truncated, lengths)
