"""Indexing and search through real encoder services (gRPC on 127.0.0.1, streaming) give the in-process vectors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from imgtxt.client import ServiceEncoder
from imgtxt.encoders.bundle import BundleEncoder
from imgtxt.encoders.types import EncodeJob
from indexer.cli import main as index_main
from search.cli import main as search_main
from store.factory import open_store
from store.ids import point_id


@pytest.fixture(scope="module")
def services(encoder_services: tuple[str, str]) -> tuple[str, str]:
    """Both services on free loopback ports, small max_batch so streams span several chunks."""
    return encoder_services


def test_streamed_jobs_are_recut_at_job_boundaries(services: tuple[str, str], encoder: BundleEncoder) -> None:
    grpc_encoder = ServiceEncoder(*services)
    jobs = [EncodeJob([], ["a"]), EncodeJob([b"not an image"], ["b", "c", "d", "e", "f"]), EncodeJob([], [])]
    results = list(grpc_encoder.encode_jobs(iter(jobs)))
    assert [(len(i), len(t)) for i, t in results] == [(0, 1), (1, 5), (0, 0)]
    assert results[1][0].outcomes[0].code == 3  # the bad image fails alone, INVALID_ARGUMENT
    np.testing.assert_allclose(results[1][1].embeddings, encoder.encode_texts(list("bcdef")).embeddings, atol=1e-5)
    grpc_encoder.close()


def test_index_and_search_through_services(
    services: tuple[str, str], dataset: Path, tmp_path: Path, tiny_bundle: Path, encoder: BundleEncoder, capsys
) -> None:  # type: ignore[no-untyped-def]
    image_target, text_target = services
    store = tmp_path / "q"
    common = ["--image-service", image_target, "--text-service", text_target, "--store", str(store)]
    argv = [str(dataset), *common, "--bundle", str(tiny_bundle), "--batch-size", "5", "--json", "-", "--no-progress"]
    assert index_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["indexed"] == {"image": 12, "text": 24, "unit": 24} and report["skipped"] == 5
    assert report["fusion"] == "trained"
    s = open_store(store)
    points = s.dump("tiny-d32-s0")
    s.close()
    image = (dataset / "images" / "img0005.jpg").read_bytes()
    expected = encoder.encode_images([image]).embeddings[0]
    np.testing.assert_allclose(points[point_id("image", "img0005.jpg")][1]["image"], expected, atol=1e-5)

    assert (
        search_main(
            [
                "--image",
                str(dataset / "images" / "img0005.jpg"),
                "--target",
                "image",
                "--top-k",
                "3",
                "--json",
                "-",
                *common,
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["payload"]["key"] == "img0005.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert (
        search_main(
            [
                "--text",
                "photo 5 shows thing 1",
                "--target",
                "unit",
                "--filter",
                "caption_index=1",
                "--json",
                "-",
                *common,
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert hits and all(h["payload"]["kind"] == "unit" and h["payload"]["caption_index"] == 1 for h in hits)


def test_services_only_units_need_the_explicit_opt_in(
    services: tuple[str, str], dataset: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    image_target, text_target = services
    common = [str(dataset), "--image-service", image_target, "--text-service", text_target, "--no-progress"]
    common += ["--store", str(tmp_path / "q")]
    # Without --bundle the services cannot make trained units: the default kinds (with unit) are refused.
    assert index_main(common) == 2
    err = capsys.readouterr().err
    assert "the services do not serve one" in err and "--untrained-fusion" in err and "--kinds image,text" in err
    assert index_main([*common, "--untrained-fusion", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fusion"] == "normalize(v+t)" and report["indexed"]["unit"] == 24
    s = open_store(tmp_path / "q")
    assert {p["fusion"] for p, _ in s.dump("tiny-d32-s0").values() if p["kind"] == "unit"} == {"normalize(v+t)"}
    s.close()


@pytest.fixture(scope="module")
def int8_services(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """Both services serving the tiny towers as trained for int8 quantisation, with an untrained unit head."""
    from image_encoder_service.server import create_server as create_image_server
    from imgtxt.bundle import load_bundle
    from imgtxt.encoders.image import ImageEncoder
    from imgtxt.encoders.session import SessionConfig
    from imgtxt.encoders.text import TextEncoder
    from imgtxt.serving.config import ServerConfig
    from tests.indexer.bundles import bundle_variant
    from text_encoder_service.server import create_server as create_text_server

    path = bundle_variant(
        tiny_bundle, tmp_path_factory.mktemp("b") / "int8", "tiny-int8", quantization="int8", unit_head_trained=False
    )
    bundle, cfg = load_bundle(path), SessionConfig(device="cpu", intra_op_threads=1)
    image = create_image_server(ServerConfig(host="127.0.0.1", port=0), ImageEncoder.from_session_config(bundle, cfg))
    text = create_text_server(ServerConfig(host="127.0.0.1", port=0), TextEncoder.from_session_config(bundle, cfg))
    try:
        image.warm_up()
        text.warm_up()
        yield f"127.0.0.1:{image.port}", f"127.0.0.1:{text.port}", path
    finally:
        image.stop(grace=0)
        text.stop(grace=0)


def test_indexing_through_the_services_follows_the_bundles_trained_quantization(
    int8_services: tuple[str, str, Path], dataset: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    from imgtxt.bundle import load_bundle

    image_target, text_target, path = int8_services
    # Info carries the bundle's serving decisions (fields 11 and 12), so the client knows the whole identity.
    client = ServiceEncoder(image_target, text_target)
    assert client.identity == load_bundle(path).identity
    assert (client.identity.quantization, client.identity.unit_head) == ("int8", "untrained")
    client.close()
    store = tmp_path / "q"
    argv = [str(dataset), "--image-service", image_target, "--text-service", text_target, "--store", str(store)]
    argv += ["--kinds", "image,text", "--json", "-", "--no-progress"]
    assert index_main(argv) == 0  # no --bundle
    report = json.loads(capsys.readouterr().out)
    assert report["collection_config"]["quantization"] == "int8" and report["warnings"] == []
    # A reopen asks for what the bundle decided: accepted, and nobody blames a --quantization never given.
    assert index_main([*argv, "--restart"]) == 0
    capsys.readouterr()
    s = open_store(store)
    assert s.collection_identity("tiny-int8") == load_bundle(path).identity
    s.close()
