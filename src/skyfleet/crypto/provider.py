"""Key providers: wrap and unwrap data keys (DEKs) with key-encryption keys (KEKs).

:class:`LocalKeyProvider` is the embedded default. Its KEK for a tenant is derived from two
secrets, neither of which is ever in the database:

* the *master key*: the key file (``SFK1`` magic, u32 version, 32 random bytes), and
* the tenant's *wrapping secret*: ``<key file>.tenants/<sha256(tenant id)>.key`` (``SFT1``
  magic, 8-byte key id, 32 random bytes), created on the tenant's first wrap.

``KEK = HKDF-SHA256(master key, salt=tenant secret, info=tenant id)``. :meth:`shred` deletes the
tenant's wrapping secret, so a wrapped DEK becomes useless everywhere, restored database backups
included. Wrapped blob, v1::

    0 format (0x01) | 1 master version (u32) | 5 tenant key id (8) | 13 nonce (12) | 25 ct+tag (48)
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import secrets
import stat
import struct
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from skyfleet.config import ConfigError
from skyfleet.crypto.cipher import KEY_BYTES, NONCE_BYTES, frame
from skyfleet.crypto.errors import DecryptionError
from skyfleet.errors import ServiceUnavailableError


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps data keys with a KEK. Wrapped blobs record which KEK (id/version) wrapped them."""

    name: str

    async def wrap(self, dek: bytes, *, tenant_id: str) -> bytes:
        """An opaque blob holding ``dek``, bound to ``tenant_id``."""
        ...

    async def unwrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        """The DEK in ``blob``; :class:`DecryptionError` on any failure (wrong tenant, shredded...)."""
        ...

    async def shred(self, tenant_id: str) -> None:
        """Destroy the tenant's KEK material, so no blob wrapped for the tenant opens again."""
        ...


_MASTER_MAGIC = b"SFK1"
_TENANT_MAGIC = b"SFT1"
_MASTER = struct.Struct(">4sI32s")
_TENANT = struct.Struct(">4s8s32s")
_BLOB_HEADER = struct.Struct(">BI8s")
_BLOB_FORMAT = 0x01
_BLOB_BYTES = _BLOB_HEADER.size + NONCE_BYTES + KEY_BYTES + 16
_KEK_INFO = b"skyfleet/tenant-kek/v1"
_WRAP_AAD = b"skyfleet/wrapped-dek/v1"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_secret_file(path: Path, content: bytes) -> bool:
    """Atomically create ``path`` (mode 0600) holding ``content``; False if it already exists.

    The bytes go to a temporary file created with ``O_CREAT|O_EXCL`` and mode 0600, then
    ``link()``-ed into place, so a concurrent reader sees either no file or the whole file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _read_secret_file(path: Path, what: str) -> bytes | None:
    """The bytes of ``path``; None if it does not exist. Refuses group/world-accessible files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"refusing to use it: run 'chmod 600 {path}'"
            )
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class LocalKeyProvider:
    """KEKs from a local key file plus per-tenant wrapping secrets beside it (see module doc)."""

    name = "local"

    def __init__(self, path: Path, master_key: bytes, master_version: int) -> None:
        """Use :meth:`open`."""
        self.path = path
        self.tenant_dir = path.with_name(path.name + ".tenants")
        self._master = master_key
        self._version = master_version

    @classmethod
    def open(cls, path: Path) -> LocalKeyProvider:
        """Load the key file at ``path``, creating it (mode 0600, 32 random bytes) on first use."""
        path = Path(path).expanduser().absolute()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            raw = _read_secret_file(path, "key file")
            if raw is None:
                _create_secret_file(path, _MASTER.pack(_MASTER_MAGIC, 1, secrets.token_bytes(KEY_BYTES)))
                raw = _read_secret_file(path, "key file")
            tenant_dir = path.with_name(path.name + ".tenants")
            tenant_dir.mkdir(mode=0o700, exist_ok=True)
            if tenant_dir.stat().st_mode & 0o077:
                raise ConfigError(
                    f"key directory {tenant_dir} is accessible by group or others: chmod 700 it"
                )
        except OSError as exc:
            raise ConfigError(f"key file {path}: {exc.strerror or exc}") from None
        if raw is None or len(raw) != _MASTER.size or raw[:4] != _MASTER_MAGIC:
            raise ConfigError(f"key file {path} is not a skyfleet key file (wrong size or header)")
        _magic, version, key = _MASTER.unpack(raw)
        return cls(path, key, version)

    # -- per-tenant wrapping secrets (blocking file I/O; called through asyncio.to_thread) --

    def _tenant_path(self, tenant_id: str) -> Path:
        digest = hashlib.sha256(tenant_id.encode("utf-8")).hexdigest()
        return self.tenant_dir / f"{digest}.key"

    def _tenant_secret(self, tenant_id: str, *, create: bool) -> tuple[bytes, bytes] | None:
        path = self._tenant_path(tenant_id)
        raw = _read_secret_file(path, "tenant key file")
        if raw is None and create:
            _create_secret_file(
                path, _TENANT.pack(_TENANT_MAGIC, secrets.token_bytes(8), secrets.token_bytes(KEY_BYTES))
            )
            raw = _read_secret_file(path, "tenant key file")
        if raw is None:
            return None
        if len(raw) != _TENANT.size or raw[:4] != _TENANT_MAGIC:
            raise ConfigError(f"tenant key file {path} is corrupt")
        _magic, key_id, secret = _TENANT.unpack(raw)
        return key_id, secret

    def _destroy(self, tenant_id: str) -> None:
        path = self._tenant_path(tenant_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:  # best effort: the filesystem may keep old blocks (SSD, copy-on-write)
            os.write(fd, bytes(_TENANT.size))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    async def _secret(self, tenant_id: str, *, create: bool) -> tuple[bytes, bytes] | None:
        try:
            return await asyncio.to_thread(self._tenant_secret, tenant_id, create=create)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise ServiceUnavailableError("the key store is unavailable") from exc

    def _kek(self, tenant_id: str, secret: bytes) -> AESGCM:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=KEY_BYTES, salt=secret, info=frame(_KEK_INFO, tenant_id)
        )
        return AESGCM(hkdf.derive(self._master))

    # -- KeyProvider --

    async def wrap(self, dek: bytes, *, tenant_id: str) -> bytes:
        if len(dek) != KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        found = await self._secret(tenant_id, create=True)
        if found is None:  # pragma: no cover - created just above
            raise ServiceUnavailableError("the key store is unavailable")
        key_id, secret = found
        header = _BLOB_HEADER.pack(_BLOB_FORMAT, self._version, key_id)
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._kek(tenant_id, secret).encrypt(nonce, bytes(dek), header + frame(_WRAP_AAD, tenant_id))
        return header + nonce + sealed

    async def unwrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        try:
            fmt, version, key_id = _BLOB_HEADER.unpack_from(blob)
        except (struct.error, TypeError):
            raise DecryptionError from None
        if fmt != _BLOB_FORMAT or version != self._version or len(blob) != _BLOB_BYTES:
            raise DecryptionError
        found = await self._secret(tenant_id, create=False)
        if found is None or found[0] != key_id:
            raise DecryptionError
        header = bytes(blob[: _BLOB_HEADER.size])
        nonce = bytes(blob[_BLOB_HEADER.size : _BLOB_HEADER.size + NONCE_BYTES])
        try:
            return self._kek(tenant_id, found[1]).decrypt(
                nonce, bytes(blob[_BLOB_HEADER.size + NONCE_BYTES :]), header + frame(_WRAP_AAD, tenant_id)
            )
        except InvalidTag:
            raise DecryptionError from None

    async def shred(self, tenant_id: str) -> None:
        try:
            await asyncio.to_thread(self._destroy, tenant_id)
        except OSError as exc:
            raise ServiceUnavailableError("the key store is unavailable") from exc
