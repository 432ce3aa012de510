"""The archive gateway on its own (``python -m builder gateway IMAGE.yaml``): the verified, caching gateway a build
starts, with the same installer suite signed by a fresh ephemeral key (and with a package lock, the same view of
the archive restricted to it), served until stopped.

It listens on 127.0.0.1 unless told otherwise. It has no authentication, so any other address needs
``allow_remote`` (``--allow-remote``) and is reported as a warning.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable
from contextlib import ExitStack

from ..archive.cache import ContentCache
from ..archive.http import FetchStats
from ..config import ImageConfig
from ..errors import ConfigError
from ..events import Emitter
from ..services import UDEB_SUITE, signed_target_views
from ..services import signed_suite as build_suite
from ..stages.fetch import InstallerInputs, fetch_inputs
from .server import Gateway, GatewayStats
from .signing import EphemeralKey

DEFAULT_HOST = "127.0.0.1"
# the binary public key of this run's ephemeral key, for whoever points an installer or apt at the suite
SIGNING_KEY = f"dists/{UDEB_SUITE}/signing-key.gpg"


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` → ``("127.0.0.1", 8080)``. The host is an IPv4 address or ``localhost`` (no name is
    resolved); it defaults to 127.0.0.1 (``":8080"``, ``"8080"``), the port to 0, any free port (``"127.0.0.1"``)."""
    raw = text.strip()
    if not raw:
        raise ConfigError("--listen: empty address; expected HOST:PORT, e.g. 127.0.0.1:8080")
    if raw.startswith("[") or raw.count(":") > 1:
        raise ConfigError(f"--listen {text}: the gateway serves IPv4 only; give an IPv4 address, e.g. 127.0.0.1:8080")
    if ":" in raw:
        host, _, port_text = raw.partition(":")
    elif re.fullmatch(r"[0-9]+", raw):
        host, port_text = "", raw
    else:
        host, port_text = raw, "0"
    host = host or DEFAULT_HOST
    if host == "localhost":
        host = DEFAULT_HOST
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(f"--listen {text}: {host!r} is not an IPv4 address (host names are not resolved)") from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ConfigError(f"--listen {text}: {port_text!r} is not a port number (0-65535; 0 picks a free port)")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: tuple[str, int], *, allow_remote: bool) -> bool:
    """Whether ``listen`` is reachable from other hosts; a ConfigError if it is and ``allow_remote`` is off."""
    host, port = listen
    if is_loopback(host):
        return False
    if not allow_remote:
        raise ConfigError(f"--listen {host}:{port} is not a loopback address: the gateway has no authentication, "
                          "pass --allow-remote to serve other hosts")
    return True


def gateway_urls(gw: Gateway, host: str) -> list[str]:
    """One URL per archive the gateway serves (``http://127.0.0.1:PORT/debian``, ``…/debian-security``)."""
    return [f"http://{host}:{gw.port}/{prefix}" for prefix in gw.upstreams]


def signed_suite(inputs: InstallerInputs, key: EphemeralKey) -> dict[str, bytes]:
    """The generated installer suite, signed, keyed by gateway path (as a build serves it), and the key's public
    part."""
    suite = build_suite(inputs, key)
    suite[f"debian/{SIGNING_KEY}"] = key.public_key()
    return suite


def serve(
    cfg: ImageConfig,
    listen: tuple[str, int],
    *,
    allow_remote: bool,
    emitter: Emitter,
    ready: Callable[[list[str]], None] | None = None,
    stop: threading.Event | None = None,
    inputs: InstallerInputs | None = None,
    cache: ContentCache | None = None,
    fetch_stats: FetchStats | None = None,
) -> GatewayStats:
    """Serve the gateway for ``cfg`` on ``listen`` until ``stop`` is set (or a KeyboardInterrupt); return its stats.

    The address is checked before anything else. ``inputs`` (default: fetched and verified from the mirror, as a
    build does, counted in ``fetch_stats``) give the installer suite; ``ready`` gets the URLs once the gateway
    listens.
    """
    host, _port = listen
    if check_listen(listen, allow_remote=allow_remote):
        emitter.warning(f"the gateway listens on {host}, which is not a loopback address: every host that can "
                        "reach it can fetch through it (it has no authentication)")
    cache = cache if cache is not None else ContentCache()
    if inputs is None:
        with emitter.stage("fetch"):
            inputs = fetch_inputs(cfg, cache, fetch_stats if fetch_stats is not None else FetchStats(), emitter,
                                  packages=True)
    stop = stop if stop is not None else threading.Event()
    with ExitStack() as stack:
        key = stack.enter_context(EphemeralKey(f"builder {cfg.name} installer suite"))
        gw = stack.enter_context(Gateway(
            upstreams=cfg.debian.upstreams,
            cache=cache, keyring=cfg.debian.keyring,
            fingerprints={"debian": cfg.debian.trusted_fingerprints,
                          "debian-security": cfg.debian.security_fingerprints},
            generated={**signed_suite(inputs, key), **signed_target_views(inputs, key)},
            pins={**inputs.udeb_pins, **(inputs.target.pins if inputs.target else {})},
            pinned_pool_only=inputs.target is not None, bind=host, port=listen[1],
        ))
        urls = gateway_urls(gw, host)
        emitter.info(f"gateway ready: {', '.join(urls)}; installer suite {UDEB_SUITE} signed by {key.fingerprint} "
                     f"(public key: {urls[0]}/{SIGNING_KEY})")
        if ready is not None:
            ready(urls)
        while not stop.wait(0.5):
            pass
        emitter.info(f"gateway stopping: {gw.stats.requests} requests, {gw.stats.served_bytes} bytes served, "
                     f"{gw.stats.upstream_bytes} bytes fetched upstream")
        return gw.stats


__all__ = ["DEFAULT_HOST", "SIGNING_KEY", "UDEB_SUITE", "check_listen", "gateway_urls", "is_loopback",
           "parse_listen", "serve", "signed_suite"]
