"""`imgtxt demo` end to end on the tiny bundle: real service subprocesses, embedded Qdrant, queries, R@K."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from demo.cli import main
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[2]


def test_demo_end_to_end_with_tiny_bundle(tmp_path: Path, tiny_bundle: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = make_dataset(tmp_path / "data", 10, captions=2)
    argv = [
        "--bundle",
        str(tiny_bundle),
        "--data",
        str(data),
        "--limit",
        "6",
        "--artifacts",
        str(tmp_path / "art"),
        "--no-serve",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SERVING" in out and "indexed image 6, text 12, unit 12" in out
    assert "text -> image queries" in out and "image -> text query" in out and "rsum" in out
    assert (tmp_path / "art" / "qdrant" / "tiny-d32-s0" / "edge_config.json").is_file()
    # A second run reuses the index (the checkpoint says the same job is done); --json PATH also writes the results.
    assert main([*argv, "--json", str(tmp_path / "demo.json")]) == 0
    assert "already indexed" in capsys.readouterr().out
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["index"]["indexed"] == {"image": 6, "text": 12, "unit": 12} and result["index"]["fusion"] == "trained"
    assert result["metrics"]["n_images"] == 6 and len(result["queries"]) == 6


def test_demo_without_data_explains_how_to_get_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--data", str(tmp_path / "nowhere"), "--artifacts", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert "no data set found" in err and "--data" in err and "--bundle" in err


def test_demo_ends_serving_the_search_page_until_ctrl_c(tmp_path: Path, tiny_bundle: Path) -> None:
    data = make_dataset(tmp_path / "data", 8, captions=2)
    argv = [
        "demo",
        "--bundle",
        str(tiny_bundle),
        "--data",
        str(data),
        "--artifacts",
        str(tmp_path / "art"),
        "--http-port",
        "0",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "imgtxt.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:  # the demo narrates each step, then prints the page's URL and waits
            if line.startswith("open http"):
                url = line.split()[1]
                break
        assert url is not None, "the demo ended without serving the page"
        with urllib.request.urlopen(url, timeout=30) as page:
            assert b"<title>imgtxt search</title>" in page.read()
        body = json.dumps({"text": "photo 3 shows thing 1", "limit": 3}).encode()
        request = urllib.request.Request(url + "v1/search", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            hits = json.loads(response.read())["hits"]
        assert len(hits) == 3 and all(h["kind"] == "image" and h["thumbnail"] for h in hits)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_demo_runs_a_secured_deployment_from_relative_paths(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_bundle: Path, capsys, monkeypatch
) -> None:
    from tests.services.conftest import self_signed_cert

    # Every path as a user types it, relative to a directory that is not the repository.
    shutil.copytree(tiny_bundle, tmp_path / "bundles" / "x")
    (tmp_path / "tls").mkdir()
    self_signed_cert(tmp_path / "tls", "demo")
    make_dataset(tmp_path / "data", 6, captions=2)
    monkeypatch.chdir(tmp_path)
    argv = [
        "--bundle",
        "bundles/x",
        "--data",
        "data",
        "--artifacts",
        "art",
        "--no-serve",
        "--tls-cert",
        "tls/demo.crt",
        "--tls-key",
        "tls/demo.key",
        "--auth-token",
        "demo-t0ken",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SERVING" in out and "indexed image 6, text 12, unit 12" in out and "rsum" in out
