"""How a client reaches an encoder service: address, TLS, token, deadline, retries — one config for every caller.

`imgtxt.client` builds its channels from a `ConnectionConfig`; `imgtxt index`, `search`, `eval --via-index` and
`demo` build theirs from the same flags and `IMGTXT_*` variables (`add_connection_flags`, `connections_from_args`).
Retries are gRPC's own retry policy (a service config on the channel), not a loop of ours: the channel retries
UNAVAILABLE (server restarting or draining, connection refused) and RESOURCE_EXHAUSTED (queue full) with exponential
backoff, within the call's deadline. Keepalive is declared once (`Keepalive`): the clients' pings and what the
servers (`imgtxt.serving.shell`) accept come from the same object, so they cannot disagree.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from imgtxt.errors import ConfigError
from imgtxt.wire import DEFAULT_MAX_MESSAGE_BYTES

SERVICES = ("imgtxt.v1.ImageEncoder", "imgtxt.v1.TextEncoder", "imgtxt.v1.SearchService")
"""The services whose rpcs the retry policy covers (all idempotent: encoding and searching change nothing)."""
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
"""What a caller may retry: the server is away or busy, the call did nothing."""
RETRIED_CODES = (*RETRYABLE_CODES, "CANCELLED")
"""What the channel's retry policy retries. A CANCELLED the server sent (never one the caller caused: a cancelled
call is not retried) comes from a stopping server: gRPC's own stop answers CANCELLED to calls it accepted but never
handed to a handler (grpc/grpc#41785), so for these idempotent rpcs it means what UNAVAILABLE means."""
# gRPC caps a retry policy's maxAttempts at 5 (the first attempt included).
MAX_ATTEMPTS = 5
DEFAULT_TARGETS = {"image": "localhost:50051", "text": "localhost:50052"}


def is_loopback(address: str) -> bool:
    """Whether `host:port` names this machine (a token may travel in plaintext only there)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive, declared once for both ends: clients ping this often, servers accept pings this often.

    A client that pings more often than its server allows gets `GOAWAY ENHANCE_YOUR_CALM (too_many_pings)`, and a
    call racing that GOAWAY can fail; gRPC servers allow one ping without data per 5 minutes by default.
    """

    time_s: float = 60.0
    """Seconds between the client's pings on a connection with nothing else to send (idle ones included)."""
    timeout_s: float = 20.0
    """Seconds the client waits for a ping's answer before it drops the connection."""

    def __post_init__(self) -> None:
        if self.time_s <= 0 or self.timeout_s <= 0:
            raise ConfigError(f"keepalive time_s and timeout_s must be > 0, got {self.time_s} and {self.timeout_s}")

    def client_options(self) -> list[tuple[str, int]]:
        """Channel options of a client."""
        return [
            ("grpc.keepalive_time_ms", int(self.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),  # find a dead connection before the next call does
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
        ]

    def server_options(self) -> list[tuple[str, int]]:
        """Server options: accept the clients' pings, idle connections included, with room for timer jitter."""
        return [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.time_s * 1000) // 2),
            ("grpc.http2.max_ping_strikes", 2),
        ]


KEEPALIVE = Keepalive()
"""The keepalive of every channel and server of the project."""


@dataclass(frozen=True)
class ConnectionConfig:
    """One encoder service as a client sees it."""

    address: str
    """`host:port` of the service."""
    tls: bool = False
    """Use TLS (implied by `tls_ca` or a client certificate); without `tls_ca`, the system's root certificates."""
    tls_ca: Path | None = None
    """PEM root certificate(s) that signed the server's certificate."""
    tls_cert: Path | None = None
    """PEM client certificate chain, for servers that require client certificates (mutual TLS)."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    token: str | None = field(default=None, repr=False)
    """Bearer token sent as `authorization` metadata."""
    timeout_s: float = 30.0
    """Deadline of each unary call, retries included, in seconds."""
    retries: int = 4
    """Retries of a call answered UNAVAILABLE or RESOURCE_EXHAUSTED (at most 4: gRPC allows 5 attempts)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest message sent or received; match the server's `--max-message-bytes`."""
    keepalive: Keepalive = KEEPALIVE
    """Keepalive pings (the servers accept `KEEPALIVE`'s; change both together)."""

    def __post_init__(self) -> None:
        if not self.address or ":" not in self.address:
            raise ConfigError(f"service address must be host:port, got {self.address!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key (the client certificate) must be given together")
        if not 0 <= self.retries <= MAX_ATTEMPTS - 1:
            raise ConfigError(f"retries must be in 0..{MAX_ATTEMPTS - 1} (gRPC's limit), got {self.retries}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.token is not None and not self.secure and not is_loopback(self.address):
            raise ConfigError(
                f"refusing to send the bearer token to {self.address} in plaintext: connect with TLS (--tls-ca CA.pem "
                "or --tls) or use a loopback address"
            )

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, when one is set."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def service_config(self) -> str:
        """The channel's service config: gRPC's retry policy for the project's services, round robin.

        No client-side health checking: a draining server reports NOT_SERVING for its load balancers and probes but
        still answers, and a channel that watched health would fail calls ("backend unhealthy") to its only
        server while that server answers them. A stopping server refuses calls with UNAVAILABLE (retried, by
        round robin on another address where there is one) once its drain is over.
        """
        policy: dict[str, Any] = {
            "maxAttempts": self.retries + 1,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": list(RETRIED_CODES),
        }
        methods = [{"name": [{"service": s} for s in SERVICES], **({"retryPolicy": policy} if self.retries else {})}]
        return json.dumps({"methodConfig": methods, "loadBalancingConfig": [{"round_robin": {}}]})

    def channel(self, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """Opens the channel (it connects lazily, on the first call)."""
        opts = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            *self.keepalive.client_options(),
            ("grpc.enable_retries", 1 if self.retries else 0),
            ("grpc.service_config", self.service_config()),
            *options,
        ]
        if not self.secure:
            return grpc.insecure_channel(self.address, opts)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes() if self.tls_ca else None,
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
        )
        return grpc.secure_channel(self.address, creds, opts)


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that calls the encoder services (each also reads `IMGTXT_<FLAG>`)."""
    d = ConnectionConfig(DEFAULT_TARGETS["image"])
    g = parser.add_argument_group("encoder services (connection)")
    g.add_argument("--image-service", default=DEFAULT_TARGETS["image"], help="image encoder service host:port")
    g.add_argument("--text-service", default=DEFAULT_TARGETS["text"], help="text encoder service host:port")
    g.add_argument("--tls-ca", type=Path, help="PEM root certificate(s) of the services' TLS certificates")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates (no --tls-ca)")
    # --tls-cert/--tls-key name a server's own certificate (serve-*); a client's certificate has its own flags.
    g.add_argument("--tls-client-cert", type=Path, help="PEM client certificate (servers that require one)")
    g.add_argument("--tls-client-key", type=Path, help="PEM private key of --tls-client-cert")
    g.add_argument("--token", help="bearer token of the services (prefer IMGTXT_TOKEN: flags show in `ps`)")
    g.add_argument("--rpc-timeout", type=float, default=d.timeout_s, help="deadline of unary service calls, seconds")
    g.add_argument("--rpc-retries", type=int, default=d.retries, help="retries on UNAVAILABLE / RESOURCE_EXHAUSTED")


def connections_from_args(args: argparse.Namespace) -> dict[str, ConnectionConfig]:
    """`{"image": ..., "text": ...}` connection configs from parsed `add_connection_flags` flags.

    Raises:
        ConfigError: Inconsistent TLS flags, a token bound for a plaintext non-loopback address, bad retries.
    """
    common = {
        "tls": args.tls,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_client_cert,
        "tls_key": args.tls_client_key,
        "token": args.token,
        "timeout_s": args.rpc_timeout,
        "retries": args.rpc_retries,
    }
    return {
        "image": ConnectionConfig(args.image_service, **common),
        "text": ConnectionConfig(args.text_service, **common),
    }
