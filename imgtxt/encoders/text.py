"""The text tower as a domain object: strings -> shared tokenizer -> ONNX Runtime -> embeddings (no gRPC)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from imgtxt.bundle import Bundle
from imgtxt.encoders.tower import Prepared, TowerEncoder
from imgtxt.encoders.types import ItemOutcome
from imgtxt.errors import InvalidInput, LimitExceeded
from imgtxt.text import TextTokenizer

_GROUP_INDEX = re.compile(r"^text \d+ ")


class TextEncoder(TowerEncoder[str, np.ndarray]):
    """Encodes texts with a bundle's text tower; thread-safe.

    Texts longer than the bundle's `max_tokens` are truncated to it and flagged (`ItemOutcome.truncated`), not
    rejected: a caption's first tokens carry most of its meaning, and a bulk job should not lose the item. Empty or
    whitespace-only texts and texts over `max_text_chars` fail alone.

    Example:
        >>> enc = TextEncoder.from_bundle("bundles/v1", device="cpu")
        >>> enc.encode(["a dog runs on the beach"]).embeddings.shape
        (1, 512)
    """

    modality = "text"
    run_overhead_tokens = 64
    """Cost of one extra session run, in padded tokens (measured order of magnitude for small transformers on CPU)."""

    def __init__(self, bundle: Bundle, session: ort.InferenceSession) -> None:
        """Wraps an open session on the bundle's text tower; the tokenizer and limits come from the manifest."""
        super().__init__(bundle, session)
        cfg = bundle.manifest.text_config
        raw = Tokenizer.from_file(str(bundle.file(cfg.tokenizer_file)))
        # Same padding id rule as the shared tokenizer; padded positions are masked out anyway.
        self._pad_id = raw.token_to_id("[PAD]") or 0
        self.tokenizer = TextTokenizer(raw, cfg)
        self.text_config = cfg

    def limits(self) -> dict[str, int]:
        """Token and character limits."""
        return {"max_tokens": self.text_config.max_tokens, "max_text_chars": self.text_config.max_text_chars}

    def prepare(self, items: Sequence[str]) -> Prepared[np.ndarray]:
        """Validates and tokenizes each text with the shared `imgtxt.text` tokenizer (truncation flagged per text)."""
        features: list[np.ndarray | None] = [None] * len(items)
        outcomes = [ItemOutcome()] * len(items)
        valid: list[int] = []
        for i, text in enumerate(items):
            try:
                self.tokenizer.validate(text)
                valid.append(i)
            except (InvalidInput, LimitExceeded) as exc:
                outcomes[i] = ItemOutcome.from_error(i, exc)
        # One batched call (fast, parallel in Rust); a text with no real token fails it, so retry those one by one.
        groups = [valid] if valid else []
        while groups:
            group = groups.pop()
            try:
                batch = self.tokenizer.encode([items[i] for i in group])
            except InvalidInput as exc:
                if len(group) == 1:
                    # The tokenizer numbers texts within this retry group (always "text 0"): the outcome names the
                    # caller's item instead.
                    reason = InvalidInput(_GROUP_INDEX.sub("text ", str(exc), count=1))
                    outcomes[group[0]] = ItemOutcome.from_error(group[0], reason)
                    continue
                groups.extend([[i] for i in group])
                continue
            for row, i in enumerate(group):
                n = batch.num_tokens[row]
                features[i] = batch.input_ids[row, :n]
                outcomes[i] = ItemOutcome(truncated=batch.truncated[row], num_tokens=n)
        return Prepared(features, outcomes)

    def run(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Runs texts in groups of similar length, so short captions are not padded to the longest one of the batch.

        A coalesced batch mixes texts of 8 and 60 tokens; padding all to 60 multiplies the work of the short ones.
        Sorted by length, the batch is cut where the padding saved outweighs the cost of one more session run.
        """
        lengths = np.array([len(f) for f in features])
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(features), self.dim), np.float32)
        for start, end in _length_groups(lengths[order].tolist(), self.run_overhead_tokens):
            idx = order[start:end]
            out[idx] = super().run([features[i] for i in idx])
        return out

    def collate(self, features: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Pads token rows (of any callers) to the longest one, with the attention mask."""
        lengths = [len(f) for f in features]
        ids = np.full((len(features), max(lengths)), self._pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, (f, n) in enumerate(zip(features, lengths, strict=True)):
            ids[row, :n] = f
            mask[row, :n] = 1
        return {self.spec.inputs[0]: ids, self.spec.inputs[1]: mask}

    def warm_up_items(self) -> list[str]:
        """Two short captions of different lengths (exercises padding)."""
        return ["a dog", "a photo of a dog running on the beach"]


def _length_groups(sorted_lengths: list[int], overhead: int) -> list[tuple[int, int]]:
    """Splits ascending lengths into contiguous groups minimising padded tokens + `overhead` per group (exact DP)."""
    n = len(sorted_lengths)
    best = [0] + [0] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        # A group (i, j) is padded to its longest text, sorted_lengths[j - 1].
        costs = [best[i] + (j - i) * sorted_lengths[j - 1] + overhead for i in range(j)]
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    groups = []
    j = n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]
