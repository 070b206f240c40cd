"""The process supervisor: services started together on one fresh cache dir, from the caller's directory, inheriting
no descriptor of the caller; the port file is read only once complete."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from imgtxt.supervisor import read_port_file, run_services


def _descriptors(pid: int | str) -> dict[int, str]:
    """What each open descriptor of a process refers to (`socket:[inode]`, `pipe:[inode]`, a path)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    out = {}
    for entry in fd_dir.iterdir():
        try:
            out[int(entry.name)] = os.readlink(entry)
        except FileNotFoundError:  # closed while listing (e.g. the listing's own descriptor)
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to list a process's descriptors")
def test_services_start_together_on_a_fresh_cache_dir_from_the_callers_directory(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    shutil.copytree(tiny_bundle, work / "bundles" / "x")
    monkeypatch.chdir(work)
    # Descriptors the caller holds, marked inheritable on purpose: the services must get none of them.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.set_inheritable(True)
    read_end, write_end = os.pipe()
    os.set_inheritable(read_end, True)
    os.set_inheritable(write_end, True)
    mine = {_descriptors("self")[fd] for fd in (listener.fileno(), read_end, write_end)}
    try:
        # Relative paths, as a user types them; "cache" does not exist yet and both services create and fill it.
        flags = ("--cache-dir", "cache", "--device", "cpu", "--intra-op-threads", "1")
        with run_services(Path("bundles/x"), extra_args=flags) as services:
            for svc in services:
                held = _descriptors(svc.process.pid)
                assert not mine & set(held.values()), f"{svc.modality} inherited {mine & set(held.values())}"
                assert held[0] == "/dev/null" and held[1] == "/dev/null"
        assert [svc.process.returncode for svc in services] == [0, 0]
    finally:
        listener.close()
        os.close(read_end)
        os.close(write_end)
    # Each tower's optimised graph is cached once, under the caller's directory, with no temporary file left behind.
    cached = sorted(p.name for p in (work / "cache").rglob("*") if p.is_file())
    assert len(cached) == 2 and cached[0].startswith("image_tower.") and cached[1].startswith("text_tower.")
    assert all(name.endswith(".onnx") for name in cached)


def test_port_file_is_read_only_once_complete(tmp_path: Path) -> None:
    port_file = tmp_path / "image.port"
    assert read_port_file(port_file) is None  # not written yet
    port_file.write_text("")
    assert read_port_file(port_file) is None  # created, nothing written
    port_file.write_text("412")
    assert read_port_file(port_file) is None  # a read racing the write of "41289\n"
    port_file.write_text("41289\n")
    assert read_port_file(port_file) == 41289
