"""The model bundle: an immutable directory of ONNX towers, tokenizer and manifest, identified by version + sha256.

The trainer writes bundles (`write_bundle`); the encoder services and the indexer read them (`load_bundle`). The
manifest states everything a server needs to reproduce training-time preprocessing exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgtxt.errors import BundleError
from imgtxt.preprocess import ImagePreprocessConfig
from imgtxt.text import TextConfig

SCHEMA_VERSION = 2
# Manifests of these versions still load; version 1 had no `serving` section (it is derived from the other fields).
READABLE_SCHEMAS = (1, 2)
MANIFEST = "manifest.json"
# One distance drives both training (cosine similarity of L2-normalised vectors) and vector-store collections.
DISTANCE = "cosine"
MODALITIES = ("image", "text", "unit")
# Graph precisions a bundle may hold; fp32 always.
PRECISIONS = ("fp32", "fp16", "int8")
# Vector-store quantisations the towers can be trained for (the collection's default quantisation).
QUANTIZATIONS = ("none", "int8", "binary")
# Where a bundle's unit head stands (`ServingSpec.unit_provenance`).
UNIT_HEADS = ("trained", "untrained", "none")
# The trainer's default unit loss weight (`trainer.config.LossConfig.unit_weight`), for configs that name none.
DEFAULT_UNIT_LOSS_WEIGHT = 0.1


@dataclass(frozen=True)
class Parity:
    """Agreement between the PyTorch tower and its ONNX graph, measured at export on real inputs."""

    max_abs_diff: float
    """Largest |torch - onnx| over all output values."""
    min_cosine: float
    """Smallest cosine similarity between a torch and an onnx output row."""
    num_inputs: int
    """How many inputs were compared."""


@dataclass(frozen=True)
class TowerSpec:
    """One ONNX graph of the bundle."""

    file: str
    """ONNX file name inside the bundle."""
    inputs: list[str]
    """Graph input names, in order (image: pixel_values; text: input_ids, attention_mask; unit: image, text)."""
    output: str = "embedding"
    """Graph output name: (N, D) float32 embeddings."""
    parity: Parity | None = None
    """Export-time parity figures."""
    fp16_file: str | None = None
    """Optional fp16 variant of the graph for GPU serving (inputs and outputs stay float32)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TowerSpec:
        """Rebuilds a tower spec from its manifest form."""
        parity = d.get("parity")
        return cls(**{**d, "parity": Parity(**parity) if parity else None})


@dataclass(frozen=True)
class RetrievalCheck:
    """A reduced-precision graph's retrieval against the fp32 graphs, measured at export: val rSum with this tower at
    its precision and the other tower at fp32, against both at fp32 (`imgtxt export --int8`)."""

    split: str
    """Split measured (`val`)."""
    images: int
    """Images of the split measured (each with its captions)."""
    fp32_rsum: float
    """rSum with both towers at fp32."""
    rsum: float
    """rSum with this tower at this precision, the other at fp32."""

    @property
    def rsum_loss(self) -> float:
        """rSum lost to this precision (negative: it gained)."""
        return self.fp32_rsum - self.rsum


@dataclass(frozen=True)
class GraphVariant:
    """One tower's graph at one precision."""

    file: str
    """ONNX file name inside the bundle (inputs and outputs are float32 / int64 at every precision)."""
    parity: Parity | None = None
    """Agreement with the float32 PyTorch tower, measured at export."""
    retrieval: RetrievalCheck | None = None
    """Reduced precisions: its val rSum against fp32, measured at export (None: not measured, e.g. older bundles);
    `--precision auto` serves an int8 graph on CPU only when this shows it safe."""

    def describe(self) -> str:
        """Its export figures in one line: parity, and the val rSum check where there is one."""
        p, r = self.parity, self.retrieval
        parts = [f"max|d|={p.max_abs_diff:.2e}  min cos={p.min_cosine:.6f}"] if p else []
        if r is not None:
            loss = f"loss {r.rsum_loss:+.2f}, {r.images} images"
            parts.append(f"{r.split} rSum {r.rsum:.2f} vs fp32 {r.fp32_rsum:.2f} ({loss})")
        return "  ".join(parts)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GraphVariant:
        """Rebuilds a variant from its manifest form."""
        parity, retrieval = d.get("parity"), d.get("retrieval")
        return cls(d["file"], Parity(**parity) if parity else None, RetrievalCheck(**retrieval) if retrieval else None)


@dataclass(frozen=True)
class ServingSpec:
    """What the trainer decided about serving: every consumer (services, indexer, search, eval) obeys it.

    A flag may override a decision (e.g. `imgtxt index --quantization`), and says so; nothing ignores it silently.
    """

    image_size: int
    """Side the image tower is served at (the preprocessing's `image_size`)."""
    flip_average: bool = False
    """The image graph averages each image's embedding with its mirror image's (test-time augmentation inside)."""
    quantization: str = "none"
    """Vector-store quantisation the towers were trained for (`none`, `int8`, `binary`): a new collection's default."""
    unit_head: bool = False
    """The bundle has a fusion head (a `unit` tower) for image+caption `unit` vectors."""
    unit_head_trained: bool = False
    """A unit loss with positive weight trained that head; an export of a head no loss trained says False, and
    indexing units with it then needs the explicit `--untrained-fusion`, as for a bundle with no head. Manifests
    written before this field existed are read from their training config (see `trained_unit_head`)."""
    precisions: dict[str, dict[str, GraphVariant]] = field(default_factory=dict)
    """Precision (`fp32`, `fp16`, `int8`) -> modality -> graph; fp32 holds every tower (int8: image and text)."""

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise BundleError(f"serving.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        unknown = sorted(set(self.precisions) - set(PRECISIONS))
        if unknown:
            raise BundleError(f"serving.precisions has unknown precision(s) {unknown}; known: {PRECISIONS}")
        if "fp32" not in self.precisions:
            raise BundleError("serving.precisions must hold the fp32 graphs")

    @property
    def unit_provenance(self) -> str:
        """`trained` (a unit loss with positive weight trained the head), `untrained` (a head no loss trained) or
        `none` (no head)."""
        return UNIT_HEADS[0] if self.unit_head_trained else UNIT_HEADS[1] if self.unit_head else UNIT_HEADS[2]

    def graph(self, modality: str, precision: str) -> GraphVariant:
        """The graph of `modality` at `precision`.

        Raises:
            BundleError: The bundle has no such graph, naming the precisions it has for the modality.
        """
        variant = self.precisions.get(precision, {}).get(modality)
        if variant is None:
            have = [p for p in PRECISIONS if modality in self.precisions.get(p, {})]
            raise BundleError(
                f"the bundle has no {precision} {modality} graph (it has: {', '.join(have) or 'none'}); "
                f"export one (`imgtxt export --{precision}`) or serve another precision"
            )
        return variant

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServingSpec:
        """Rebuilds the section from its manifest form."""
        precisions = {
            p: {m: GraphVariant.from_dict(v) for m, v in towers.items()}
            for p, towers in d.get("precisions", {}).items()
        }
        return cls(**{**d, "precisions": precisions})


def trained_quantization(training: dict[str, Any]) -> str:
    """The vector-store quantisation a training config optimised for: its quantisation loss's mode, or `none`.

    Reads the flat layout (`losses`, `loss_kwargs`) and the grouped one (`loss.weights`, `loss.kwargs`).
    """
    loss: dict[str, Any] = training["loss"] if isinstance(training.get("loss"), dict) else {}
    weights = training.get("losses") or loss.get("weights") or {}
    kwargs = training.get("loss_kwargs") or loss.get("kwargs") or {}
    if "quantization" not in weights:
        return "none"
    return str((kwargs.get("quantization") or {}).get("mode", "int8"))


def trained_unit_head(training: dict[str, Any], has_head: bool) -> bool:
    """Whether a training config trained its unit head: a unit loss weight above 0 (flat `unit_loss_weight`, or
    grouped `loss.unit_weight`). A config that names no weight used the trainer's default, 0.1, so its head was
    trained when it has one (how manifests written before `serving.unit_head_trained` existed are read)."""
    loss: dict[str, Any] = training["loss"] if isinstance(training.get("loss"), dict) else {}
    weight = training.get("unit_loss_weight", loss.get("unit_weight", DEFAULT_UNIT_LOSS_WEIGHT))
    return has_head and float(weight) > 0


# Placeholder default of `Manifest.serving`: replaced in `__post_init__` by the section derived from the other fields.
_DERIVE = ServingSpec(image_size=0, precisions={"fp32": {}})


def _legacy_serving(d: dict[str, Any], image: TowerSpec, text: TowerSpec, unit: TowerSpec | None) -> ServingSpec:
    """The serving section of a schema-1 manifest, from the fields that held those decisions then."""
    training = d.get("training") or {}
    exported = training.get("export") or {}
    towers = {"image": image, "text": text, **({"unit": unit} if unit else {})}
    precisions: dict[str, dict[str, GraphVariant]] = {
        "fp32": {m: GraphVariant(t.file, t.parity) for m, t in towers.items()}
    }
    fp16_parity = (d.get("metrics") or {}).get("fp16_parity") or {}
    fp16 = {
        m: GraphVariant(t.fp16_file, Parity(**fp16_parity[m]) if m in fp16_parity else None)
        for m, t in towers.items()
        if t.fp16_file
    }
    if fp16:
        precisions["fp16"] = fp16
    return ServingSpec(
        image_size=int(d["image_preprocess"]["image_size"]),
        flip_average=bool(exported.get("flip_average", False)),
        quantization=trained_quantization(training),
        unit_head=unit is not None,
        unit_head_trained=trained_unit_head(training, unit is not None),
        precisions=precisions,
    )


@dataclass(frozen=True)
class Manifest:
    """Contents of `manifest.json` (schema version 2; version 1 manifests load with a derived `serving` section)."""

    bundle_version: str
    """Version string; the vector-store collection is named after it."""
    embedding_dim: int
    """Dimension D of every served vector."""
    image: TowerSpec
    """The image tower."""
    text: TowerSpec
    """The text tower."""
    image_preprocess: ImagePreprocessConfig
    """How image bytes become the image tower's input."""
    text_config: TextConfig
    """Tokenizer file and token limits of the text tower."""
    onnx_opset: int
    """ONNX opset of the graphs."""
    normalized: bool = True
    """Outputs are L2-normalised inside the graphs (cosine = dot product)."""
    distance: str = DISTANCE
    """Distance the space was trained for."""
    unit: TowerSpec | None = None
    """Optional fusion head mapping (image, text) embeddings to one `unit` vector."""
    created_at: str = ""
    """ISO-8601 UTC time of export."""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of every file of the bundle except the manifest, by file name."""
    training: dict[str, Any] = field(default_factory=dict)
    """Resolved training config the towers came from."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Evaluation figures measured before export (e.g. val R@K)."""
    serving: ServingSpec = field(default_factory=lambda: _DERIVE)
    """How the bundle is served and indexed (side, flip averaging, precisions, trained quantisation, unit head);
    when not given, derived from the other fields as a schema-1 manifest's is."""
    schema_version: int = SCHEMA_VERSION
    """Manifest schema version."""

    def __post_init__(self) -> None:
        if self.schema_version not in READABLE_SCHEMAS:
            raise BundleError(
                f"manifest schema_version {self.schema_version} is not supported (readable: {READABLE_SCHEMAS})"
            )
        if not self.bundle_version or any(c in self.bundle_version for c in "/\\ "):
            raise BundleError(f"bundle_version must be non-empty with no '/', '\\' or spaces: {self.bundle_version!r}")
        if self.embedding_dim <= 0:
            raise BundleError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.distance != DISTANCE:
            raise BundleError(f"distance must be {DISTANCE!r}, got {self.distance!r}")
        if self.serving is _DERIVE:
            legacy = {
                "training": self.training,
                "metrics": self.metrics,
                "image_preprocess": {"image_size": self.image_preprocess.image_size},
            }
            object.__setattr__(self, "serving", _legacy_serving(legacy, self.image, self.text, self.unit))
        sv = self.serving
        if sv.image_size != self.image_preprocess.image_size:
            raise BundleError(
                f"serving.image_size {sv.image_size} differs from image_preprocess.image_size "
                f"{self.image_preprocess.image_size}"
            )
        if sv.unit_head_trained and not sv.unit_head:
            raise BundleError("serving.unit_head_trained is true but the bundle has no unit head")
        if sv.unit_head != (self.unit is not None):
            raise BundleError(
                f"serving.unit_head is {sv.unit_head} but the bundle {'has' if self.unit else 'has no'} unit tower"
            )
        for modality in ("image", "text", "unit"):
            spec = getattr(self, modality)
            fp32 = sv.precisions["fp32"].get(modality)
            if spec is not None and (fp32 is None or fp32.file != spec.file):
                raise BundleError(f"serving.precisions.fp32.{modality} must name {spec.file}")

    def tower(self, modality: str) -> TowerSpec:
        """The spec of `image`, `text` or `unit`.

        Raises:
            BundleError: Unknown modality, or a unit tower the bundle does not have.
        """
        if modality not in MODALITIES:
            raise BundleError(f"modality must be one of {MODALITIES}, got {modality!r}")
        spec = getattr(self, modality)
        if spec is None:
            raise BundleError(f"bundle {self.bundle_version} has no {modality} tower")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["image_preprocess"] = self.image_preprocess.to_dict()
        d["text_config"] = self.text_config.to_dict()
        d["serving"] = self.serving.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        """Parses and validates a manifest dictionary.

        Raises:
            BundleError: Missing or malformed fields, naming the field.
        """
        if not isinstance(d, dict):
            raise BundleError("manifest must be a JSON object")
        if d.get("schema_version", SCHEMA_VERSION) not in READABLE_SCHEMAS:
            raise BundleError(
                f"manifest schema_version {d.get('schema_version')} is not supported (readable: {READABLE_SCHEMAS})"
            )
        required = ("bundle_version", "embedding_dim", "image", "text", "image_preprocess", "text_config", "onnx_opset")
        missing = [k for k in required if k not in d]
        if missing:
            raise BundleError(f"manifest is missing required field(s): {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise BundleError(f"manifest has unknown field(s): {', '.join(unknown)}")
        try:
            image, text = TowerSpec.from_dict(d["image"]), TowerSpec.from_dict(d["text"])
            unit = TowerSpec.from_dict(d["unit"]) if d.get("unit") else None
            if d.get("serving"):
                recorded = d["serving"]
                if "unit_head_trained" not in recorded:  # written before the field: read the training config
                    trained = trained_unit_head(d.get("training") or {}, bool(recorded.get("unit_head")))
                    recorded = {**recorded, "unit_head_trained": trained}
                serving = ServingSpec.from_dict(recorded)
            elif d.get("schema_version", SCHEMA_VERSION) == 1:
                serving = _legacy_serving(d, image, text, unit)
            else:
                raise BundleError("manifest is missing required field(s): serving")
            return cls(
                **{
                    **d,
                    "image": image,
                    "text": text,
                    "unit": unit,
                    "image_preprocess": ImagePreprocessConfig.from_dict(d["image_preprocess"]),
                    "text_config": TextConfig.from_dict(d["text_config"]),
                    "serving": serving,
                }
            )
        except BundleError:
            raise
        except (TypeError, ValueError) as exc:
            raise BundleError(f"manifest is malformed: {exc}") from exc


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_digest(files: dict[str, str]) -> str:
    """The bundle's identity: sha256 over its sorted `name  sha256` lines (the manifest itself excluded)."""
    lines = "".join(f"{name}  {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class BundleIdentity:
    """What identifies the bundle that encodes a vector space: a collection records the one that wrote it, and
    every writer and reader compares its own with it (`store.identity`)."""

    version: str
    """Bundle version string."""
    sha256: str
    """Digest of the bundle's files (`bundle_digest`); empty when the source does not report it."""
    dim: int
    """Embedding dimension."""
    distance: str = DISTANCE
    """Distance the space was trained for."""
    quantization: str = "none"
    """Vector-store quantisation the towers were trained for (`serving.quantization`); empty when unknown."""
    unit_head: str = "none"
    """`trained`, `untrained` or `none` (`serving.unit_provenance`); empty when unknown."""

    def same_space(self, other: BundleIdentity) -> bool:
        """Whether both describe one bundle: same version, digest, dimension and distance."""
        return (self.version, self.sha256, self.dim, self.distance) == (
            other.version,
            other.sha256,
            other.dim,
            other.distance,
        )

    def describe(self) -> str:
        """One line for messages: version, digest prefix, dimension, distance, quantisation, unit head."""
        return (
            f"bundle {self.version} (sha256 {self.sha256[:12] or '?'}, dim {self.dim}, {self.distance}, trained for "
            f"quantization {self.quantization or '?'}, unit head {self.unit_head or '?'})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what a collection records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BundleIdentity:
        """Rebuilds an identity from `to_dict`'s form (unknown keys ignored)."""
        return cls(
            version=str(d["version"]),
            sha256=str(d.get("sha256", "")),
            dim=int(d["dim"]),
            distance=str(d.get("distance", DISTANCE)),
            quantization=str(d.get("quantization", "")),
            unit_head=str(d.get("unit_head", "")),
        )


@dataclass(frozen=True)
class Bundle:
    """A loaded (and verified) model bundle."""

    path: Path
    """The bundle directory."""
    manifest: Manifest
    """Its parsed manifest."""

    @property
    def version(self) -> str:
        """The bundle version string."""
        return self.manifest.bundle_version

    @property
    def sha256(self) -> str:
        """Digest identifying the bundle's files."""
        return bundle_digest(self.manifest.files)

    @property
    def identity(self) -> BundleIdentity:
        """The bundle's identity, as a collection records it."""
        m = self.manifest
        return BundleIdentity(
            m.bundle_version,
            self.sha256,
            m.embedding_dim,
            m.distance,
            m.serving.quantization,
            m.serving.unit_provenance,
        )

    def file(self, name: str) -> Path:
        """Absolute path of a bundle file."""
        return self.path / name


def write_bundle(out_dir: str | Path, manifest: Manifest, files: dict[str, str | Path]) -> Bundle:
    """Writes a bundle: copies `files` (bundle name -> source path), hashes them, writes the manifest last.

    The bundle is assembled in a temporary sibling directory and renamed into place, so a reader never sees a half
    written bundle. Bundles are immutable: an existing non-empty `out_dir` is an error.

    Raises:
        BundleError: `out_dir` exists and is not empty, or the manifest names a file that is not given.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"bundle directory {out} exists and is not empty; bundles are immutable, pick a new path")
    named = {manifest.image.file, manifest.text.file, manifest.text_config.tokenizer_file}
    if manifest.unit:
        named.add(manifest.unit.file)
    for spec in (manifest.image, manifest.text, manifest.unit):
        if spec and spec.fp16_file:
            named.add(spec.fp16_file)
    named |= {v.file for towers in manifest.serving.precisions.values() for v in towers.values()}
    absent = sorted(named - set(files))
    if absent:
        raise BundleError(f"manifest names file(s) not given to write_bundle: {', '.join(absent)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by services that may run as another user
    try:
        hashes = {}
        for name, src in sorted(files.items()):
            if "/" in name or name == MANIFEST:
                raise BundleError(f"invalid bundle file name {name!r}")
            shutil.copyfile(src, tmp / name)
            hashes[name] = sha256_file(tmp / name)
        final = Manifest.from_dict({**manifest.to_dict(), "files": hashes})
        (tmp / MANIFEST).write_text(json.dumps(final.to_dict(), indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, final)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Reads and validates a bundle.

    Args:
        path: The bundle directory.
        verify: Check every file's sha256 against the manifest (off only for trusted, already verified bundles).

    Raises:
        BundleError: Missing directory or manifest, malformed manifest, missing file, or hash mismatch.
    """
    root = Path(path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not a model bundle: {MANIFEST} not found")
    try:
        raw = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mpath} is not valid JSON: {exc}") from exc
    manifest = Manifest.from_dict(raw)
    named = [manifest.image.file, manifest.text.file, manifest.text_config.tokenizer_file]
    if manifest.unit:
        named.append(manifest.unit.file)
    named += [v.file for towers in manifest.serving.precisions.values() for v in towers.values()]
    for name in named:
        if name not in manifest.files:
            raise BundleError(f"manifest names {name!r} but records no hash for it")
    for name, digest in manifest.files.items():
        fpath = root / name
        if not fpath.is_file():
            raise BundleError(f"bundle file {name!r} is missing from {root}")
        if verify and sha256_file(fpath) != digest:
            raise BundleError(f"bundle file {name!r} does not match its sha256 in the manifest (tampered or corrupt)")
    return Bundle(root.resolve(), manifest)
