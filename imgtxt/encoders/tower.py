"""The domain encoder shared by both towers: items -> prepared features -> one ONNX Runtime run -> embeddings.

Subclasses (`ImageEncoder`, `TextEncoder`) only say how one item becomes features and how features are stacked into
the graph's inputs; preparation errors become per-item outcomes, so one bad item never fails its batch.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np
import onnxruntime as ort

from imgtxt.bundle import Bundle, TowerSpec, load_bundle
from imgtxt.encoders.session import (
    SessionConfig,
    active_provider,
    choose_precision,
    create_session,
    default_cache_dir,
    expected_provider,
)
from imgtxt.encoders.types import EncodeResult, EncoderInfo, ItemOutcome
from imgtxt.errors import ImgTxtError

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
FeatureT = TypeVar("FeatureT")


@dataclass(frozen=True)
class Prepared(Generic[FeatureT]):
    """A batch after per-item preprocessing: features of the good items, an outcome for every item."""

    features: list[FeatureT | None]
    """Per item: its features, or None when it failed."""
    outcomes: list[ItemOutcome]
    """Per item: OK (with token counts for text) or the reason it failed."""

    @property
    def good(self) -> list[FeatureT]:
        """Features of the items that prepared, in order."""
        return [f for f in self.features if f is not None]

    def assemble(self, rows: np.ndarray, dim: int) -> EncodeResult:
        """Places the embeddings of the good items at their positions; failed items get zero rows."""
        out = np.zeros((len(self.features), dim), np.float32)
        idx = [i for i, f in enumerate(self.features) if f is not None]
        if idx:
            out[idx] = rows
        return EncodeResult(out, self.outcomes)


class TowerEncoder(ABC, Generic[ItemT, FeatureT]):
    """One tower of a bundle behind one ONNX Runtime session; thread-safe.

    Use `encode` in-process, or `prepare` + `run` to let a batcher merge the features of several callers into one
    session run.
    """

    modality: ClassVar[str]
    """`image` or `text`: which tower of the bundle this class serves."""
    precision: str = "fp32"
    """Precision of the graph the session runs (`fp32`, `fp16`, `int8`), set by `from_session_config`."""
    precision_reason: str = ""
    """Why that precision (`imgtxt.encoders.session.PrecisionChoice.reason`), set by `from_session_config`."""

    def __init__(self, bundle: Bundle, session: ort.InferenceSession) -> None:
        self.bundle = bundle
        self.spec: TowerSpec = bundle.manifest.tower(self.modality)
        self.session = session
        self.dim = bundle.manifest.embedding_dim
        declared = [i.name for i in session.get_inputs()]
        if declared != list(self.spec.inputs):
            raise ImgTxtError(
                f"{self.spec.file}: graph inputs {declared} differ from the manifest's {self.spec.inputs}"
            )

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        cache_dir: str | Path | None = None,
        verify: bool = True,
        **options: Any,
    ) -> Self:
        """Loads (and verifies) a bundle and opens a session on its tower.

        Args:
            path: Bundle directory.
            device: `auto` (CUDA when it loads, else CPU), `cpu`, or `cuda` (raise when CUDA is unusable).
            intra_op_threads: Threads inside one operator (0 = available cores - 1, at least 1).
            inter_op_threads: Threads across independent operators.
            cache_dir: Cache of optimised models; None = the user cache directory (`default_cache_dir()`).
            verify: Check the bundle's file hashes.
            **options: Modality-specific options of the subclass constructor (e.g. `limits` for images).

        Raises:
            BundleError: Bad bundle.
            DeviceUnavailable: `device="cuda"` and CUDA is not usable.
        """
        bundle = load_bundle(path, verify=verify)
        cfg = SessionConfig(
            device=device,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        )
        return cls.from_session_config(bundle, cfg, **options)

    @classmethod
    def from_session_config(cls, bundle: Bundle, cfg: SessionConfig, precision: str = "fp32", **options: Any) -> Self:
        """Opens a session on this modality's tower of an already loaded bundle, at a precision the bundle holds.

        Args:
            bundle: The loaded bundle.
            cfg: Device, threads, optimisation and cache of the session.
            precision: `fp32`, `fp16`, `int8`, or `auto` (`imgtxt.encoders.session.choose_precision`: fp16 on CUDA
                when the bundle has an fp16 graph; on CPU int8 when the bundle records that its int8 graph loses at
                most 0.5 val rSum; fp32 otherwise).
            **options: Modality-specific options of the subclass constructor (e.g. `limits` for images).

        Raises:
            BundleError: The bundle has no graph of this modality at `precision`, naming the ones it has.
            ConfigError: Unknown precision.
            DeviceUnavailable: `device="cuda"` and CUDA is not usable.
        """
        serving = bundle.manifest.serving
        expected = expected_provider(cfg.device)
        choice = choose_precision(precision, cls.modality, serving, expected)
        session = create_session(
            bundle.file(serving.graph(cls.modality, choice.precision).file), cfg, cache_key=bundle.sha256[:32]
        )
        actual = active_provider(session)
        if choice.source == "auto" and actual != expected:  # CUDA did not load: decide again for the CPU
            fallback = choose_precision(precision, cls.modality, serving, actual)
            if fallback.precision != choice.precision:
                logger.warning(
                    "CUDA did not load: serving the %s graph instead of %s",
                    fallback.precision,
                    choice.precision,
                    extra={"modality": cls.modality},
                )
                session = create_session(
                    bundle.file(serving.graph(cls.modality, fallback.precision).file), cfg, cache_key=bundle.sha256[:32]
                )
            choice = fallback
        encoder = cls(bundle, session, **options)
        encoder.precision, encoder.precision_reason = choice.precision, choice.reason
        logger.info(
            "encoder loaded",
            extra={
                "modality": cls.modality,
                "bundle": bundle.version,
                "provider": encoder.provider,
                "precision": choice.precision,
                "precision_reason": choice.reason,
                "intra_op_threads": cfg.resolved_intra_op_threads,
            },
        )
        return encoder

    @property
    def provider(self) -> str:
        """Execution provider the session actually runs on."""
        return active_provider(self.session)

    @property
    def intra_op_threads(self) -> int:
        """Threads one session run may use inside an operator (as the session was built)."""
        return int(self.session.get_session_options().intra_op_num_threads)

    @property
    def info(self) -> EncoderInfo:
        """Bundle, provider and per-item limits."""
        m = self.bundle.manifest
        return EncoderInfo(
            modality=self.modality,
            bundle_version=m.bundle_version,
            bundle_sha256=self.bundle.sha256,
            dim=self.dim,
            normalized=m.normalized,
            distance=m.distance,
            execution_provider=self.provider,
            providers=list(self.session.get_providers()),
            precision=self.precision,
            precision_reason=self.precision_reason,
            limits=self.limits(),
        )

    @abstractmethod
    def limits(self) -> dict[str, int]:
        """Per-item limits, named as in the wire contract's `Limits` message."""

    @abstractmethod
    def prepare(self, items: Sequence[ItemT]) -> Prepared[FeatureT]:
        """Preprocesses items one by one, turning each item's InvalidInput/LimitExceeded into its outcome."""

    @abstractmethod
    def collate(self, features: Sequence[FeatureT]) -> dict[str, np.ndarray]:
        """Stacks prepared features (of any callers) into the graph's input feed."""

    @abstractmethod
    def warm_up_items(self) -> list[ItemT]:
        """A small valid batch run once before serving, so the first request pays no lazy initialisation."""

    def run(self, features: Sequence[FeatureT]) -> np.ndarray:
        """One session run over prepared features: (len(features), D) float32."""
        (out,) = self.session.run([self.spec.output], self.collate(features))
        return np.asarray(out, dtype=np.float32)

    def encode(self, items: Sequence[ItemT], batch_size: int = 256) -> EncodeResult:
        """Encodes items in-process, running the session on at most `batch_size` good items at a time.

        Args:
            items: Images (encoded bytes) or texts.
            batch_size: Most items per session run (bounds memory).

        Returns:
            Embeddings (zeros for failed items) and one outcome per item.
        """
        prepared = self.prepare(items)
        good = prepared.good
        rows = [self.run(good[i : i + batch_size]) for i in range(0, len(good), batch_size)]
        return prepared.assemble(np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32), self.dim)

    def close(self) -> None:
        """Releases helper threads (the session itself is freed with the object)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm_up(self) -> None:
        """Runs one warm-up batch.

        Raises:
            ImgTxtError: The warm-up items failed to prepare or the output has the wrong shape.
        """
        items = self.warm_up_items()
        result = self.encode(items)
        if not all(o.ok for o in result.outcomes) or result.embeddings.shape != (len(items), self.dim):
            raise ImgTxtError(f"warm-up failed: {result.outcomes}, shape {result.embeddings.shape}")
        logger.info("warm-up done", extra={"modality": self.modality, "items": len(items)})
