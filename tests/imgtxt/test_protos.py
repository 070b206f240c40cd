"""The generated stubs are exactly what `python -m imgtxt.protogen` produces from `protos/` (a stale stub fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgtxt import protogen
from imgtxt.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2

COMPILED = {"encoder": encoder_pb2, "search": search_pb2}


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="needs the [dev] extra")
    generated = protogen.generate(tmp_path)
    assert generated
    for fresh in generated:
        committed = protogen.ROOT / fresh.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run `python -m imgtxt.protogen`"
        assert fresh.read_text() == committed.read_text(), f"{committed} is stale: run `python -m imgtxt.protogen`"


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_descriptors_match_the_proto_sources(tmp_path: Path, name: str) -> None:
    pytest.importorskip("grpc_tools", reason="needs the [dev] extra")
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    assert (
        protoc.main(["protoc", f"-I{protogen.PROTO_ROOT}", f"--descriptor_set_out={out}", f"imgtxt/v1/{name}.proto"])
        == 0
    )
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    compiled = fds.file[0]
    messages = list(compiled.message_type)
    while messages:  # protoc fills json_name; the runtime descriptor omits the defaults (map entries are nested)
        message = messages.pop()
        messages.extend(message.nested_type)
        for f in message.field:
            f.ClearField("json_name")
    ours = descriptor_pb2.FileDescriptorProto.FromString(COMPILED[name].DESCRIPTOR.serialized_pb)
    assert compiled == ours
    assert compiled.package == "imgtxt.v1"


def test_both_services_expose_encode_stream_and_info() -> None:
    services = encoder_pb2.DESCRIPTOR.services_by_name
    for name in ("ImageEncoder", "TextEncoder"):
        methods = services[name].methods_by_name
        assert set(methods) == {"Encode", "EncodeStream", "Info"}
        assert methods["EncodeStream"].client_streaming and methods["EncodeStream"].server_streaming
        assert hasattr(encoder_pb2_grpc, f"{name}Stub") and hasattr(encoder_pb2_grpc, f"add_{name}Servicer_to_server")


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_every_message_and_rpc_is_commented(name: str) -> None:
    source = (protogen.PROTO_ROOT / "imgtxt" / "v1" / f"{name}.proto").read_text().splitlines()
    for i, line in enumerate(source):
        stripped = line.strip()
        if stripped.startswith(("message ", "service ", "rpc ")) or (
            stripped and not stripped.startswith(("//", "}", "syntax", "package")) and stripped.endswith(";")
        ):
            assert source[i - 1].strip().startswith("//"), f"{name}.proto line {i + 1} has no comment: {stripped}"
