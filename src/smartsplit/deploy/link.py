"""The authenticated link: gRPC servers and channels with mutual TLS from a certificate folder, or plain text
in a lab (``insecure``), and who the peer at the other end is.

With certificates, a peer's identity is its certificate's common name, checked by TLS against the private
authority (``smartsplit certs``): a connection without a certificate, with an expired one or with one from
another authority never reaches SmartSplit's code (gRPC refuses it in the handshake). Without certificates
(``--insecure``), a peer's identity is what it claims, in the ``smartsplit-identity`` header: anyone on the
network can join, impersonate a device and read every tensor.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from smartsplit.deploy.certs import identity_of, load_identity, tls_name
from smartsplit.deploy.wire import STREAM_LIMIT, UNARY_LIMIT

log = logging.getLogger(__name__)

IDENTITY_HEADER = "smartsplit-identity"
INSECURE_WARNING = ("INSECURE: no TLS and no certificates; any machine that can reach this port can join, claim any "
                    "identity and read every tensor. Use it only on a lab network you trust.")


@functools.lru_cache(maxsize=1)
def _warn_insecure() -> None:
    """Once per process, loudly."""
    log.warning(INSECURE_WARNING)


KEEPALIVE_MS = 20_000  # each end pings an idle link this often, so a dead peer is noticed within a minute


def _options(limit: int) -> list[tuple[str, int]]:
    """Both ends' settings. Keepalive agrees on both: each end pings every ``KEEPALIVE_MS`` even without calls,
    and the server accepts pings that often (gRPC's default refuses pings closer than 5 minutes with GOAWAY
    ``too_many_pings``, which used to tear idle device streams down every minute)."""
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2), ("grpc.http2.max_ping_strikes", 0)]


def start_server(servicer_adders, listen: str, certs: Path | None, name: str, workers: int = 32,
                 unary: bool = True) -> tuple[grpc.Server, int]:
    """A gRPC server for ``name`` (its certificate in ``certs``; None: insecure) on ``listen`` (HOST:PORT, port
    0 for any free one); returns it started, and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=_options(UNARY_LIMIT if unary else STREAM_LIMIT))
    for add in servicer_adders:
        add(server)
    if certs is None:
        _warn_insecure()
        port = server.add_insecure_port(listen)
    else:
        me = load_identity(certs, name)
        credentials = grpc.ssl_server_credentials([(me.key, me.certificate)], root_certificates=me.authority,
                                                  require_client_auth=True)
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        from smartsplit.errors import SmartSplitError

        raise SmartSplitError(f"--listen {listen}: cannot listen there (address in use, or not this machine's?)")
    server.start()
    return server, port


def open_channel(address: str, certs: Path | None, name: str, unary: bool = True) -> grpc.Channel:
    """A channel to ``address`` as ``name`` (its certificate in ``certs``; None: insecure). With certificates, the
    peer must prove the role ``name`` talks to: an edge for a device, the server for an edge."""
    options = _options(UNARY_LIMIT if unary else STREAM_LIMIT)
    if certs is None:
        _warn_insecure()
        return grpc.insecure_channel(address, options=options)
    role, _ = identity_of(name)
    options.append(("grpc.ssl_target_name_override", tls_name({"device": "edge", "edge": "server"}.get(role, role))))
    me = load_identity(certs, name)
    credentials = grpc.ssl_channel_credentials(root_certificates=me.authority, private_key=me.key,
                                               certificate_chain=me.certificate)
    return grpc.secure_channel(address, credentials, options=options)


def claimed(name: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that names the caller on an insecure link (ignored where TLS names it)."""
    return ((IDENTITY_HEADER, name),)


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The caller's identity: its certificate's common name, or on an insecure link what it claims."""
    names = context.auth_context().get("x509_common_name")
    if names:
        return names[0].decode()
    for key, value in context.invocation_metadata():
        if key == IDENTITY_HEADER:
            return value
    return None


@dataclass
class ShapedLink:
    """A device's link, emulated in the link layer: each message waits the one-way latency plus its transfer time
    at the link's bandwidth, times ``scale`` (the testbed's wall seconds per second of the fleet's time). The
    device's stream carries one message at a time, so a sleep per message paces it exactly at the rate, as a token
    bucket with a one-message burst would. ``busy_s`` adds up the wall seconds spent."""

    down_bytes_per_s: float
    up_bytes_per_s: float
    latency_s: float
    scale: float = 1.0
    busy_s: float = 0.0

    def down(self, nbytes: int, data: bool = True) -> None:
        self._wait(nbytes / self.down_bytes_per_s, data)

    def up(self, nbytes: int, data: bool = True) -> None:
        self._wait(nbytes / self.up_bytes_per_s, data)

    def _wait(self, transfer_s: float, data: bool) -> None:
        """``data``: a message a real device's link carries pays the latency too; a control call only its bytes."""
        seconds = self.scale * ((self.latency_s if data else 0.0) + transfer_s)
        self.busy_s += seconds
        time.sleep(seconds)
