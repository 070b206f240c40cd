"""Flags + IMGTXT_* environment configuration, and the packed float32 wire format."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from imgtxt.config import apply_env_defaults, env_name, positive_int
from imgtxt.errors import InvalidInput
from imgtxt.wire import pack_embeddings, unpack_embeddings


def _parser(env: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--max-batch", type=positive_int, default=32, help="items per batch")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tls", action="store_true")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("-v", "--verbose", action="count", default=0)
    apply_env_defaults(p, env)
    return p


def test_flag_beats_env_beats_default() -> None:
    assert env_name("--max-batch") == "IMGTXT_MAX_BATCH"
    assert _parser({}).parse_args([]).max_batch == 32
    assert _parser({"IMGTXT_MAX_BATCH": "8"}).parse_args([]).max_batch == 8
    assert _parser({"IMGTXT_MAX_BATCH": "8"}).parse_args(["--max-batch", "4"]).max_batch == 4
    assert _parser({"IMGTXT_TLS": "true"}).parse_args([]).tls is True
    assert _parser({"IMGTXT_VERBOSE": "2"}).parse_args([]).verbose == 2
    assert _parser({}).parse_args([]).flip is None
    assert _parser({"IMGTXT_FLIP": "off"}).parse_args([]).flip is False
    assert _parser({"IMGTXT_FLIP": "off"}).parse_args(["--flip"]).flip is True
    assert _parser({"IMGTXT_FLIP": "yes"}).parse_args(["--no-flip"]).flip is False
    assert "[env IMGTXT_MAX_BATCH]" in _parser({}).format_help()


@pytest.mark.parametrize(
    "env",
    [{"IMGTXT_MAX_BATCH": "zero"}, {"IMGTXT_MAX_BATCH": "-1"}, {"IMGTXT_DEVICE": "tpu"}, {"IMGTXT_FLIP": "maybe"}],
)
def test_bad_env_values_fail_naming_the_variable(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser(env)
    assert next(iter(env)) in capsys.readouterr().err


def test_pack_unpack_round_trip_is_little_endian_float32() -> None:
    x = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    data = pack_embeddings(x)
    assert len(data) == 24 and data[:4] == np.float32(0).tobytes()
    np.testing.assert_array_equal(unpack_embeddings(data, 3), x.astype(np.float32))
    with pytest.raises(InvalidInput, match="not a multiple of dim"):
        unpack_embeddings(data[:-1], 3)
    with pytest.raises(InvalidInput, match="2-D"):
        pack_embeddings(np.zeros(3))
