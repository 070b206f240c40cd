"""Every client path reaches a secured deployment: encoder services with TLS and a bearer token, reached by
`imgtxt index`, `imgtxt search` and `imgtxt eval --via-index` through the one connection config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaluation.cli import main as eval_main
from image_encoder_service.server import create_server as create_image_server
from imgtxt.bundle import load_bundle
from imgtxt.encoders.image import ImageEncoder
from imgtxt.encoders.session import SessionConfig
from imgtxt.encoders.text import TextEncoder
from imgtxt.serving.config import ServerConfig
from indexer.cli import main as index_main
from search.cli import main as search_main
from tests.conftest import make_dataset
from tests.services.conftest import self_signed_cert
from text_encoder_service.server import create_server as create_text_server

TOKEN = "deploy-s3cret"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[tuple[str, str, Path]]:
    """Both services TLS-only with a token; yields (image address, text address, CA certificate)."""
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"), "server")
    bundle, cfg = load_bundle(tiny_bundle), SessionConfig(device="cpu", intra_op_threads=1)
    servers = []
    try:
        for create, encoder_class in ((create_image_server, ImageEncoder), (create_text_server, TextEncoder)):
            config = ServerConfig(host="127.0.0.1", port=0, tls_cert=cert, tls_key=key, auth_token=TOKEN)
            server = create(config, encoder_class.from_session_config(bundle, cfg))
            server.warm_up()
            servers.append(server)
        yield f"127.0.0.1:{servers[0].port}", f"127.0.0.1:{servers[1].port}", cert
    finally:
        for server in servers:
            server.stop(grace=0)


def _connect(secured: tuple[str, str, Path]) -> list[str]:
    image, text, ca = secured
    return ["--image-service", image, "--text-service", text, "--tls-ca", str(ca)]


def test_index_search_and_eval_reach_tls_and_token_services(
    secured: tuple[str, str, Path],
    tiny_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = make_dataset(tmp_path / "data", 6, captions=2)
    store = ["--store", str(tmp_path / "q")]
    monkeypatch.setenv("IMGTXT_TOKEN", TOKEN)  # the documented way to pass the token (flags show in `ps`)
    index = [str(data), *_connect(secured), *store, "--bundle", str(tiny_bundle), "--no-progress", "--json", "-"]
    assert index_main(index) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["indexed"] == {"image": 6, "text": 12, "unit": 12}
    assert (
        search_main(["--text", "photo 2 shows thing 1", "--top-k", "3", *_connect(secured), *store, "--json", "-"]) == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["payload"]["kind"] == "image" for h in hits)
    out = tmp_path / "eval.json"
    argv = ["--via-index", "--data", str(data), *_connect(secured), "--exact", "--json", str(out)]
    assert eval_main(argv) == 0
    assert json.loads(out.read_text())["n_images"] == 6


def test_without_the_token_or_the_ca_the_cli_fails_clearly(
    secured: tuple[str, str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IMGTXT_TOKEN", raising=False)
    store = ["--store", str(tmp_path / "q")]
    assert search_main(["--text", "a dog", *_connect(secured), *store, "--rpc-retries", "0"]) != 0
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    image, text, _ = secured
    plain = ["--image-service", image, "--text-service", text, "--rpc-retries", "0", "--rpc-timeout", "5"]
    assert search_main(["--text", "a dog", *plain, *store, "--token", TOKEN]) != 0
    assert "UNAVAILABLE" in capsys.readouterr().err  # a plaintext client cannot talk to the TLS-only port
