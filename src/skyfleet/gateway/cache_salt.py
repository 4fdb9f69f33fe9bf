"""Per-tenant prefix-cache salts for engines that take one (vLLM, SGLang, and the simulated engine).

A shared prefix cache is a timing side channel: if tenant B's prompt starts like tenant A's, B's
first token comes sooner and B learns what A sent. vLLM and SGLang mix a request's ``cache_salt``
into the hash of its first KV block, so requests with different salts never share cached blocks.
The gateway sets it on every request to such a replica, from the authenticated tenant only::

    salt = base64url(HMAC-SHA256(secret, b"skyfleet/cache-salt/v1" || tenant_id))   # 43 chars, no padding

and always removes a ``cache_salt`` the client sent (a client choosing its salt could join another
tenant's cache partition, or split its own). llama.cpp takes no salt; there the slot manager
(:mod:`skyfleet.engines.kvstate`) keeps tenants apart.

**Public prefix opt-in.** A tenant with ``share_public_prefix`` gets :data:`PUBLIC` 's salt,
``HMAC(secret, b"skyfleet/cache-salt/v1" || b"\\x00public")`` (no tenant id contains NUL), shared
by all opted-in tenants. They gain cache hits on prompts they have in common (a public system
prompt or document) and accept, among themselves only, the side channel above for their whole
prompts; tenants that did not opt in never share a partition with them or with each other.

**The secret.** ``cache_salt_secret`` in the settings, or else 32 random bytes in
``<data_dir>/keys/cache-salt.key`` (created 0600 on first start). Gateways that share replicas
should share the secret too: a tenant then has one salt everywhere and hits its cache whichever
gateway it came through (different secrets cost cache hits, never isolation). Changing the secret
only makes every tenant's cached prefixes cold once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from skyfleet.config import ConfigError
from skyfleet.iam.principal import Principal

DOMAIN = b"skyfleet/cache-salt/v1"
PUBLIC = b"\x00public"
SECRET_BYTES = 32
#: Engine kinds that honour ``cache_salt`` (vLLM semantics). llama.cpp does not.
SALTED_ENGINES = frozenset({"vllm", "sglang", "sim"})
#: A request body field the client may never set: the gateway owns it.
FIELD = "cache_salt"
_MEMO_MAX = 4096


def derive_salt(secret: bytes, partition: bytes) -> str:
    """``base64url(HMAC-SHA256(secret, DOMAIN || partition))`` without padding."""
    mac = hmac.new(secret, DOMAIN + partition, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def tenant_salt(secret: bytes, tenant_id: str) -> str:
    return derive_salt(secret, tenant_id.encode("utf-8", "surrogatepass"))


class CacheSalter:
    """The salt of each principal's cache partition, memoised per tenant (HMAC once, then a dict hit)."""

    __slots__ = ("_memo", "_public", "_secret")

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the cache-salt secret must be at least 16 bytes")
        self._secret = secret
        self._public = derive_salt(secret, PUBLIC)
        self._memo: dict[str, str] = {}

    @property
    def public_salt(self) -> str:
        return self._public

    def salt_for(self, principal: Principal) -> str:
        if principal.share_public_prefix:
            return self._public
        tenant = principal.tenant_id
        salt = self._memo.get(tenant)
        if salt is None:
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()  # a bounded memo of a pure function: dropping it costs one HMAC each
            salt = self._memo[tenant] = tenant_salt(self._secret, tenant)
        return salt


def load_or_create_secret(path: Path) -> bytes:
    """The secret in ``path`` (created with 32 random bytes, mode 0600, if missing). Blocking: run in a thread."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            _create(path, secrets.token_bytes(SECRET_BYTES))
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
                raise ConfigError(f"cache-salt secret {path} must be a regular file of mode 0600 "
                                  f"(run 'chmod 600 {path}')")
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        if len(data) != SECRET_BYTES:
            raise ConfigError(f"cache-salt secret {path} is damaged: expected {SECRET_BYTES} bytes")
        return data
    raise ConfigError(f"cache-salt secret {path} could not be created")


def _create(path: Path, content: bytes) -> None:
    """Write to a private temporary file, then link it into place: readers see no file or the whole file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)
