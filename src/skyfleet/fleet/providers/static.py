"""Static replicas: engines skyfleet routes to but does not run (e.g. vLLM on a GPU host).

An ``https://`` replica gets its TLS client context here, once, at start: TLS 1.2 or newer, its
``tls_ca_file`` (else the system's CAs), the gateway's ``tls_client_cert``/``tls_client_key`` for
mTLS. Requests, health checks and metrics scrapes all use it, so a replica whose certificate does
not verify (or that refuses the gateway's) never passes a health check and never becomes READY:
requests for its model get a 503 ``no replica available``, never a plaintext fallback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from urllib.parse import urlsplit

from skyfleet.config import ConfigError, StaticReplica
from skyfleet.cost.pricing import Pricing
from skyfleet.fleet.registry import ReplicaRegistry
from skyfleet.fleet.replica import ReplicaSpec
from skyfleet.gateway.upstream import UpstreamClient, client_tls_context

log = logging.getLogger("skyfleet.fleet")


def tls_context(index: int, replica: StaticReplica) -> ssl.SSLContext | None:
    """The client context for an https:// replica (None for http://). Blocking: reads the files."""
    if not replica.url.startswith("https://"):
        return None
    try:
        return client_tls_context(ca_file=replica.tls_ca_file, cert_file=replica.tls_client_cert,
                                  key_file=replica.tls_client_key, verify=replica.tls_verify)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"static_replicas.{index}: cannot load its TLS files ({reason})") from None


def _check_origins(replicas: tuple[StaticReplica, ...]) -> None:
    """One server, one TLS configuration: contexts are looked up by origin (scheme, host, port)."""
    seen: dict[str, tuple[int, tuple[object, ...]]] = {}
    for i, r in enumerate(replicas):
        if not r.url.startswith("https://"):
            continue
        origin = urlsplit(r.url)
        key = f"{origin.scheme}://{origin.netloc}".lower()
        tls = (r.tls_ca_file, r.tls_client_cert, r.tls_client_key, r.tls_verify)
        first = seen.setdefault(key, (i, tls))
        if first[1] != tls:
            raise ConfigError(f"static_replicas.{first[0]} and static_replicas.{i} name the same server ({key}) "
                              "with different TLS settings")


async def register_static(replicas: tuple[StaticReplica, ...], registry: ReplicaRegistry,
                          upstream: UpstreamClient | None = None, pricing: Pricing | None = None) -> None:
    """Add each configured replica as STARTING; the health checker promotes it.

    ``upstream`` receives the TLS context of each https:// replica (required when there is one).
    ``pricing`` (built from the same settings) gives each its pool, tier and price.
    """
    _check_origins(replicas)
    contexts = await asyncio.to_thread(lambda: [tls_context(i, r) for i, r in enumerate(replicas)])
    for i, (r, ctx) in enumerate(zip(replicas, contexts, strict=True)):
        if ctx is not None:
            if upstream is None:
                raise ValueError("an https:// static replica needs the upstream client for its TLS context")
            upstream.use_tls(r.url, ctx)
            if not r.tls_verify:
                log.warning("TLS VERIFICATION IS OFF for a static replica: the connection is encrypted but anyone "
                            "on the network path can impersonate the replica and read every prompt; set "
                            "tls_ca_file instead", extra={"replica_id": f"static-{i}", "replica_url": r.url})
        cost = pricing.replica_cost(f"static-{i}") if pricing is not None else None
        registry.add(
            ReplicaSpec(
                id=f"static-{i}",
                base_url=r.url,
                model=r.model,
                engine=r.engine,
                upstream_model=r.upstream_model or r.model,
                context_window=r.context_window,
                pool=cost.pool if cost is not None else (r.pool or "static"),
                tier=cost.tier if cost is not None else "external",
                instance_type=r.instance_type,
                region=r.region,
                usd_per_hour=cost.usd_per_hour if cost is not None else None,
                api_key=r.api_key.get_secret_value() if r.api_key else None,
            ),
            capacity=r.capacity,
        )
