"""Client and server keepalive come from one declaration: an idle channel is never told `too_many_pings`."""

from __future__ import annotations

import threading
import time

import grpc

from imgtxt.client import TextEncoderClient
from imgtxt.connection import ConnectionConfig, Keepalive
from imgtxt.encoders.text import TextEncoder
from tests.services.conftest import serving
from text_encoder_service.server import create_server

FAST = Keepalive(time_s=1.0, timeout_s=5)
"""Pings every second (gRPC clients wait at least 1 s between pings): a server at gRPC's defaults (no pings on a
connection without calls, 2 strikes) sends GOAWAY ENHANCE_YOUR_CALM on the third."""


def test_an_idle_channel_keeps_its_connection_past_many_ping_intervals(text_encoder: TextEncoder) -> None:
    with serving(create_server, text_encoder, keepalive=FAST) as server:
        config = ConnectionConfig(f"127.0.0.1:{server.port}", keepalive=FAST, retries=0)
        with TextEncoderClient(config) as client:
            assert client.encode(["before the idle time"]).ok.all()
            states: list[grpc.ChannelConnectivity] = []
            lock = threading.Lock()

            def record(state: grpc.ChannelConnectivity) -> None:
                with lock:
                    states.append(state)

            client._channel.subscribe(record)
            # Idle for 6 ping intervals: the duration is what is tested, nothing is waited for.
            time.sleep(6 * FAST.time_s)
            assert client.encode(["after the idle time"]).ok.all()
            client._channel.unsubscribe(record)
        with lock:
            # A GOAWAY drops the connection: the channel leaves READY (IDLE, then CONNECTING again).
            assert set(states) == {grpc.ChannelConnectivity.READY}, states
