"""Model bundle contract: write -> load round trip, hashing, validation errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from imgtxt.bundle import (
    MANIFEST,
    GraphVariant,
    Manifest,
    Parity,
    RetrievalCheck,
    TowerSpec,
    bundle_digest,
    load_bundle,
    sha256_file,
    write_bundle,
)
from imgtxt.errors import BundleError
from imgtxt.preprocess import ImagePreprocessConfig
from imgtxt.text import TextConfig


def _manifest(version: str = "test-1", unit: bool = False, training: dict | None = None) -> Manifest:
    return Manifest(
        bundle_version=version,
        embedding_dim=8,
        image=TowerSpec("image_tower.onnx", ["pixel_values"], parity=Parity(1e-6, 0.99999, 4)),
        text=TowerSpec("text_tower.onnx", ["input_ids", "attention_mask"]),
        unit=TowerSpec("unit_head.onnx", ["image", "text"]) if unit else None,
        image_preprocess=ImagePreprocessConfig(image_size=64, resize="squash"),
        text_config=TextConfig(max_tokens=16),
        onnx_opset=17,
        training=training or {"lr": 0.001, "losses": {"infonce": 1.0}},
    )


def _sources(tmp_path: Path, unit: bool = False) -> dict[str, str | Path]:
    src = tmp_path / "src"
    src.mkdir()
    names = ["image_tower.onnx", "text_tower.onnx", "tokenizer.json"] + (["unit_head.onnx"] if unit else [])
    files: dict[str, str | Path] = {}
    for i, name in enumerate(names):
        (src / name).write_bytes(bytes([i]) * (100 + i))
        files[name] = src / name
    return files


def test_round_trip_gives_identical_manifest(tmp_path: Path) -> None:
    written = write_bundle(tmp_path / "b", _manifest(unit=True), _sources(tmp_path, unit=True))
    loaded = load_bundle(tmp_path / "b")
    assert loaded.manifest == written.manifest
    assert loaded.manifest.files["image_tower.onnx"] == sha256_file(tmp_path / "b" / "image_tower.onnx")
    assert loaded.sha256 == bundle_digest(loaded.manifest.files) and len(loaded.sha256) == 64
    assert loaded.manifest.image.parity == Parity(1e-6, 0.99999, 4)
    assert loaded.manifest.image_preprocess.resize == "squash"
    assert loaded.manifest.tower("unit").file == "unit_head.onnx"
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
    # The manifest on disk is plain JSON a non-Python server can read.
    raw = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert raw["schema_version"] == 2 and raw["distance"] == "cosine"
    assert raw["serving"]["precisions"]["fp32"]["unit"]["file"] == "unit_head.onnx"


def test_serving_section_states_what_the_trainer_decided(tmp_path: Path) -> None:
    training = {
        "losses": {"infonce": 1.0, "quantization": 1.0},
        "loss_kwargs": {"quantization": {"mode": "binary"}},
        "export": {"flip_average": True},
    }
    written = write_bundle(tmp_path / "b", _manifest(unit=True, training=training), _sources(tmp_path, unit=True))
    sv = load_bundle(tmp_path / "b").manifest.serving
    assert sv == written.manifest.serving
    assert (sv.image_size, sv.flip_average, sv.quantization, sv.unit_head) == (64, True, "binary", True)
    assert sv.graph("text", "fp32").file == "text_tower.onnx"
    with pytest.raises(BundleError, match=r"no fp16 image graph \(it has: fp32\).*--fp16"):
        sv.graph("image", "fp16")
    with pytest.raises(BundleError, match=r"serving\.image_size 32 differs"):
        replace(written.manifest, serving=replace(sv, image_size=32))


def test_schema_1_manifests_still_load_with_a_derived_serving_section(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", _manifest(unit=False), _sources(tmp_path))
    path = tmp_path / "b" / MANIFEST
    raw = json.loads(path.read_text())
    del raw["serving"]
    raw["schema_version"] = 1
    raw["image"]["fp16_file"] = "image_tower.onnx"  # a v1 fp16 variant (any hashed file will do here)
    raw["metrics"] = {"fp16_parity": {"image": {"max_abs_diff": 0.01, "min_cosine": 0.999, "num_inputs": 2}}}
    path.write_text(json.dumps(raw))
    m = load_bundle(tmp_path / "b").manifest
    assert m.serving.quantization == "none" and not m.serving.unit_head and not m.serving.flip_average
    assert m.serving.image_size == m.image_preprocess.image_size
    assert m.serving.graph("image", "fp16") == GraphVariant("image_tower.onnx", Parity(0.01, 0.999, 2))
    raw["schema_version"] = 2  # a version-2 manifest must carry its serving section
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="serving"):
        load_bundle(tmp_path / "b")


def test_tampered_file_fails_hash_check(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", _manifest(), _sources(tmp_path))
    (tmp_path / "b" / "text_tower.onnx").write_bytes(b"evil")
    with pytest.raises(BundleError, match=r"text_tower.onnx.*sha256"):
        load_bundle(tmp_path / "b")
    assert load_bundle(tmp_path / "b", verify=False).version == "test-1"


def test_missing_file_and_manifest_errors(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", _manifest(), _sources(tmp_path))
    (tmp_path / "b" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer.json.*missing"):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match=r"manifest.json not found"):
        load_bundle(tmp_path)


def test_bundles_are_immutable(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", _manifest(), _sources(tmp_path))
    with pytest.raises(BundleError, match="immutable"):
        write_bundle(tmp_path / "b", _manifest("test-2"), {})


def test_manifest_naming_an_absent_file_is_refused(tmp_path: Path) -> None:
    files = _sources(tmp_path)
    del files["tokenizer.json"]
    with pytest.raises(BundleError, match=r"tokenizer.json"):
        write_bundle(tmp_path / "b", _manifest(), files)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("embedding_dim"), "missing required field.*embedding_dim"),
        (lambda d: d.update(schema_version=99), "schema_version 99"),
        (lambda d: d.update(surprise=1), "unknown field.*surprise"),
        (lambda d: d.update(embedding_dim=0), "embedding_dim must be positive"),
        (lambda d: d.update(distance="dot"), "distance must be 'cosine'"),
        (lambda d: d["image_preprocess"].update(resize="stretch"), "resize must be one of"),
        (lambda d: d["text_config"].update(max_tokens=1), "max_tokens must be >= 3"),
    ],
)
def test_manifest_validation_names_the_field(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    write_bundle(tmp_path / "b", _manifest(), _sources(tmp_path))
    path = tmp_path / "b" / MANIFEST
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path / "b")


def test_unit_tower_absent_is_a_clear_error() -> None:
    with pytest.raises(BundleError, match="no unit tower"):
        _manifest().tower("unit")
    with pytest.raises(BundleError, match="modality must be one of"):
        _manifest().tower("audio")


def test_bundle_info_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from imgtxt.cli import main

    write_bundle(tmp_path / "b", _manifest(), _sources(tmp_path))
    assert main(["bundle-info", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "test-1" in out and "min cos=0.999990" in out
    # `--json PATH|-` as in every command: `-` prints only the manifest, PATH writes it and prints the summary.
    assert main(["bundle-info", str(tmp_path / "b"), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle_version"] == "test-1"
    assert main(["bundle-info", str(tmp_path / "b"), "--json", str(tmp_path / "m.json")]) == 0
    assert "test-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text()) == load_bundle(tmp_path / "b").manifest.to_dict()
    with pytest.raises(SystemExit) as exc:  # the old switch, without a value
        main(["bundle-info", str(tmp_path / "b"), "--json"])
    assert exc.value.code == 2 and "--json: expected one argument" in capsys.readouterr().err
    (tmp_path / "b" / "image_tower.onnx").write_bytes(b"x")
    assert main(["bundle-info", str(tmp_path / "b")]) == 2  # imgtxt.errors.EXIT_USAGE, as every command
    assert "does not match its sha256" in capsys.readouterr().err


def test_trained_quantization_reads_the_flat_and_the_grouped_training_layout() -> None:
    from imgtxt.bundle import trained_quantization

    flat = {"losses": {"infonce": 1.0, "quantization": 0.5}, "loss_kwargs": {"quantization": {"mode": "binary"}}}
    grouped = {"loss": {"weights": {"quantization": 1.0}, "kwargs": {"quantization": {"mode": "int8"}}}}
    assert trained_quantization(flat) == "binary" and trained_quantization(grouped) == "int8"
    assert (
        trained_quantization({"loss": {"weights": {"infonce": 1.0}}}) == "none" and trained_quantization({}) == "none"
    )


@pytest.mark.parametrize(
    ("training", "unit", "provenance"),
    [
        ({"unit_loss_weight": 0.0}, True, "untrained"),
        ({"loss": {"unit_weight": 0.0}}, True, "untrained"),  # the grouped layout configs are saved in
        ({"loss": {"unit_weight": 0.5}}, True, "trained"),
        ({"lr": 0.001}, True, "trained"),  # no weight named: the trainer's default, 0.1
        ({"unit_loss_weight": 0.5}, False, "none"),
    ],
)
def test_unit_head_provenance_follows_the_unit_loss_weight(
    tmp_path: Path, training: dict, unit: bool, provenance: str
) -> None:
    write_bundle(tmp_path / "b", _manifest(unit=unit, training=training), _sources(tmp_path, unit=unit))
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest.serving.unit_provenance == provenance
    assert bundle.identity.unit_head == provenance


def test_manifests_written_before_the_provenance_field_read_it_from_their_training_config(tmp_path: Path) -> None:
    training = {"loss": {"weights": {"infonce": 1.0}, "unit_weight": 0.0}}
    write_bundle(tmp_path / "b", _manifest(unit=True, training=training), _sources(tmp_path, unit=True))
    path = tmp_path / "b" / MANIFEST
    raw = json.loads(path.read_text())
    del raw["serving"]["unit_head_trained"]  # as written before the field existed, when it said "trained"
    path.write_text(json.dumps(raw))
    assert load_bundle(tmp_path / "b").manifest.serving.unit_provenance == "untrained"
    raw["training"]["loss"]["unit_weight"] = 0.1
    path.write_text(json.dumps(raw))
    assert load_bundle(tmp_path / "b").manifest.serving.unit_provenance == "trained"
    raw["serving"]["unit_head_trained"] = True
    raw["serving"]["unit_head"] = False
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="unit_head"):
        load_bundle(tmp_path / "b")


def test_the_identity_names_version_digest_dimension_and_serving_decisions(tmp_path: Path) -> None:
    training = {"losses": {"infonce": 1.0, "quantization": 1.0}, "loss_kwargs": {"quantization": {"mode": "int8"}}}
    bundle = write_bundle(tmp_path / "b", _manifest(unit=True, training=training), _sources(tmp_path, unit=True))
    ident = load_bundle(tmp_path / "b").identity
    assert (ident.version, ident.sha256, ident.dim, ident.distance) == ("test-1", bundle.sha256, 8, "cosine")
    assert (ident.quantization, ident.unit_head) == ("int8", "trained")
    assert ident.same_space(type(ident).from_dict(ident.to_dict()))
    assert not ident.same_space(replace(ident, sha256="0" * 64)) and not ident.same_space(replace(ident, version="x"))


def test_int8_retrieval_check_round_trips_and_older_manifests_load_without_it(tmp_path: Path) -> None:
    check = RetrievalCheck(split="val", images=1000, fp32_rsum=261.5, rsum=261.2)
    assert check.rsum_loss == pytest.approx(0.3)
    base = _manifest()
    precisions = {
        **base.serving.precisions,
        "int8": {"image": GraphVariant("image_tower.onnx", None, check), "text": GraphVariant("text_tower.onnx")},
    }
    written = write_bundle(
        tmp_path / "b", replace(base, serving=replace(base.serving, precisions=precisions)), _sources(tmp_path)
    )
    raw = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert raw["serving"]["precisions"]["int8"]["image"]["retrieval"] == {
        "split": "val",
        "images": 1000,
        "fp32_rsum": 261.5,
        "rsum": 261.2,
    }
    loaded = load_bundle(tmp_path / "b").manifest.serving
    assert loaded == written.manifest.serving
    assert loaded.graph("image", "int8").retrieval == check and loaded.graph("text", "int8").retrieval is None
    assert loaded.graph("image", "int8").describe() == "val rSum 261.20 vs fp32 261.50 (loss +0.30, 1000 images)"
    # a manifest written before the field existed (no `retrieval` key at all) still loads
    for variant in raw["serving"]["precisions"]["int8"].values():
        variant.pop("retrieval")
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(raw))
    assert load_bundle(tmp_path / "b").manifest.serving.graph("image", "int8").retrieval is None
