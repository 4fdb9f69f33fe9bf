"""The embedded key provider: KEKs from a local key file plus per-tenant wrapping secrets.

Its KEK for a tenant is derived from two secrets, neither of which is ever in the database:

* the *master key*: the key file, one or more 40-byte records ``SFK1 | u32 version | 32 bytes``
  in ascending version order. The highest version is current (new wraps use it); older ones are
  kept only while a KEK rotation rewraps the stored DEKs, then retired (removed). A file written
  before rotation existed is simply the one-record case.
* the tenant's *wrapping secret*: ``<key file>.tenants/<sha256(tenant id)>.key`` (``SFT1``
  magic, 8-byte key id, 32 random bytes), created on the tenant's first wrap.

``KEK = HKDF-SHA256(master key, salt=tenant secret, info=tenant id)``. :meth:`shred` deletes the
tenant's wrapping secret, so a wrapped DEK becomes useless everywhere, restored database backups
included. Wrapped blob, v1 (unchanged by rotation; the version field names the master record)::

    0 format (0x01) | 1 master version (u32) | 5 tenant key id (8) | 13 nonce (12) | 25 ct+tag (48)

Several processes share the key file (gateways, the CLI). The file is only ever replaced whole
(write a temporary file, ``rename`` over it), under an advisory lock (``<key file>.lock``), so
a reader sees the old or the new file, never a mix. A process notices a rotation done elsewhere:
every wrap re-reads the file if it changed (wraps are rare: one per tenant and DEK version), and
an unwrap that meets an unknown master version re-reads it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from skyfleet.config import ConfigError
from skyfleet.crypto.cipher import KEY_BYTES, MAX_KEY_VERSION, NONCE_BYTES, frame
from skyfleet.crypto.errors import DecryptionError
from skyfleet.errors import ServiceUnavailableError

_MASTER_MAGIC = b"SFK1"
_TENANT_MAGIC = b"SFT1"
_MASTER = struct.Struct(">4sI32s")
_TENANT = struct.Struct(">4s8s32s")
_BLOB_HEADER = struct.Struct(">BI8s")
_BLOB_FORMAT = 0x01
_BLOB_BYTES = _BLOB_HEADER.size + NONCE_BYTES + KEY_BYTES + 16
_KEK_INFO = b"skyfleet/tenant-kek/v1"
_WRAP_AAD = b"skyfleet/wrapped-dek/v1"

_P = ParamSpec("_P")
_T = TypeVar("_T")

#: What identifies one version of a file: (device, inode, size, mtime in ns).
_Stamp = tuple[int, int, int, int]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, content: bytes) -> Path:
    """A new 0600 temporary file beside ``path`` holding ``content`` (fsynced)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def _create_secret_file(path: Path, content: bytes) -> bool:
    """Atomically create ``path`` (mode 0600) holding ``content``; False if it already exists.

    The bytes go to a temporary file created with ``O_CREAT|O_EXCL`` and mode 0600, then
    ``link()``-ed into place, so a concurrent reader sees either no file or the whole file.
    """
    tmp = _write_temp(path, content)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _replace_secret_file(path: Path, content: bytes) -> None:
    """Atomically replace ``path`` (mode 0600) by a file holding ``content``."""
    tmp = _write_temp(path, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _stamp(info: os.stat_result) -> _Stamp:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _read_secret(path: Path, what: str) -> tuple[bytes, _Stamp] | None:
    """The bytes of ``path`` and its stamp; None if it does not exist. Refuses group/world-accessible files."""
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
        return b"".join(chunks), _stamp(info)
    finally:
        os.close(fd)


def _read_secret_file(path: Path, what: str) -> bytes | None:
    found = _read_secret(path, what)
    return None if found is None else found[0]


def parse_key_file(raw: bytes) -> dict[int, bytes]:
    """The master keys in a key file, by version; :class:`ValueError` if it is not a valid one."""
    if not raw or len(raw) % _MASTER.size:
        raise ValueError("wrong size")
    masters: dict[int, bytes] = {}
    previous = -1
    for offset in range(0, len(raw), _MASTER.size):
        magic, version, key = _MASTER.unpack_from(raw, offset)
        if magic != _MASTER_MAGIC:
            raise ValueError("wrong header")
        if version <= previous:
            raise ValueError("versions not ascending")
        masters[version] = key
        previous = version
    return masters


def format_key_file(masters: Mapping[int, bytes]) -> bytes:
    """The key file holding ``masters`` (ascending versions)."""
    if not masters:
        raise ValueError("a key file holds at least one master key")
    out = bytearray()
    for version in sorted(masters):
        key = masters[version]
        if not 0 <= version <= MAX_KEY_VERSION or len(key) != KEY_BYTES:
            raise ValueError("a master key is a u32 version and 32 bytes")
        out += _MASTER.pack(_MASTER_MAGIC, version, key)
    return bytes(out)


def _load_key_file(path: Path) -> tuple[dict[int, bytes], _Stamp]:
    found = _read_secret(path, "key file")
    if found is None:
        raise ConfigError(f"key file {path} disappeared")
    try:
        return parse_key_file(found[0]), found[1]
    except ValueError:
        raise ConfigError(f"key file {path} is not a skyfleet key file (wrong size or header)") from None


class LocalKeyProvider:
    """KEKs from a local key file plus per-tenant wrapping secrets beside it (see module doc)."""

    name = "local"

    def __init__(self, path: Path, masters: Mapping[int, bytes], stamp: _Stamp | None = None) -> None:
        """Use :meth:`open`."""
        if not masters:
            raise ValueError("at least one master key is needed")
        self.path = path
        self.tenant_dir = path.with_name(path.name + ".tenants")
        self._masters: dict[int, bytes] = dict(masters)
        self._stamp = stamp

    @classmethod
    def open(cls, path: Path) -> LocalKeyProvider:
        """Load the key file at ``path``, creating it (mode 0600, 32 random bytes) on first use."""
        path = Path(path).expanduser().absolute()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            found = _read_secret(path, "key file")
            if found is None:
                _create_secret_file(path, _MASTER.pack(_MASTER_MAGIC, 1, secrets.token_bytes(KEY_BYTES)))
                found = _read_secret(path, "key file")
            tenant_dir = path.with_name(path.name + ".tenants")
            tenant_dir.mkdir(mode=0o700, exist_ok=True)
            if tenant_dir.stat().st_mode & 0o077:
                raise ConfigError(
                    f"key directory {tenant_dir} is accessible by group or others: chmod 700 it"
                )
        except OSError as exc:
            raise ConfigError(f"key file {path}: {exc.strerror or exc}") from None
        try:
            if found is None:
                raise ValueError("missing")
            masters = parse_key_file(found[0])
        except ValueError:
            raise ConfigError(f"key file {path} is not a skyfleet key file (wrong size or header)") from None
        return cls(path, masters, found[1])

    @property
    def version(self) -> int:
        """The current master version (new wraps use it)."""
        return max(self._masters)

    @property
    def versions(self) -> tuple[int, ...]:
        """Every master version this process can unwrap with."""
        return tuple(sorted(self._masters))

    @property
    def _master(self) -> bytes:
        return self._masters[self.version]

    # -- the key file (blocking; called through asyncio.to_thread) --

    def _refresh(self) -> None:
        """Re-read the key file if another process replaced it."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise ConfigError(f"key file {self.path} disappeared") from None
        if _stamp(info) != self._stamp:
            self._masters, self._stamp = _load_key_file(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The advisory lock serialising changes to the key file between processes."""
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _add_version(self) -> int:
        with self._locked():
            masters, _ = _load_key_file(self.path)
            version = max(masters) + 1
            if version > MAX_KEY_VERSION:
                raise ConfigError(f"key file {self.path}: no master version left")
            masters[version] = secrets.token_bytes(KEY_BYTES)
            _replace_secret_file(self.path, format_key_file(masters))
            self._masters, self._stamp = _load_key_file(self.path)
            return version

    def _keep_only(self, version: int) -> None:
        with self._locked():
            masters, _ = _load_key_file(self.path)
            if max(masters) != version:
                raise ConfigError(
                    f"key file {self.path} changed during the rotation (current version is now "
                    f"{max(masters)}): run the rotation again"
                )
            if len(masters) > 1:
                _replace_secret_file(self.path, format_key_file({version: masters[version]}))
            self._masters, self._stamp = _load_key_file(self.path)

    @staticmethod
    async def _file_op(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except OSError as exc:
            raise ServiceUnavailableError("the key store is unavailable") from exc

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

    def _prepare_wrap(self, tenant_id: str) -> tuple[int, bytes, bytes, bytes]:
        """The current master (re-read if changed elsewhere) and the tenant's secret, created if new."""
        self._refresh()
        found = self._tenant_secret(tenant_id, create=True)
        if found is None:  # pragma: no cover - created just above
            raise FileNotFoundError(errno.ENOENT, "tenant key file vanished")
        version = self.version
        return version, self._masters[version], found[0], found[1]

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

    @staticmethod
    def _kek(master: bytes, tenant_id: str, secret: bytes) -> AESGCM:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=KEY_BYTES, salt=secret, info=frame(_KEK_INFO, tenant_id)
        )
        return AESGCM(hkdf.derive(master))

    @staticmethod
    def _seal(master: bytes, version: int, key_id: bytes, secret: bytes, dek: bytes, tenant_id: str,
              nonce: bytes) -> bytes:
        header = _BLOB_HEADER.pack(_BLOB_FORMAT, version, key_id)
        kek = LocalKeyProvider._kek(master, tenant_id, secret)
        return header + nonce + kek.encrypt(nonce, bytes(dek), header + frame(_WRAP_AAD, tenant_id))

    # -- KeyProvider --

    async def wrap(self, dek: bytes, *, tenant_id: str) -> bytes:
        if len(dek) != KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        version, master, key_id, secret = await self._file_op(self._prepare_wrap, tenant_id)
        return self._seal(master, version, key_id, secret, dek, tenant_id, os.urandom(NONCE_BYTES))

    async def unwrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        try:
            fmt, version, key_id = _BLOB_HEADER.unpack_from(blob)
        except (struct.error, TypeError):
            raise DecryptionError from None
        if fmt != _BLOB_FORMAT or len(blob) != _BLOB_BYTES:
            raise DecryptionError
        master = self._masters.get(version)
        if master is None:  # rotated by another process since this one read the key file?
            await self._file_op(self._refresh)
            master = self._masters.get(version)
            if master is None:
                raise DecryptionError
        found = await self._secret(tenant_id, create=False)
        if found is None or found[0] != key_id:
            raise DecryptionError
        header = bytes(blob[: _BLOB_HEADER.size])
        nonce = bytes(blob[_BLOB_HEADER.size : _BLOB_HEADER.size + NONCE_BYTES])
        try:
            return self._kek(master, tenant_id, found[1]).decrypt(
                nonce, bytes(blob[_BLOB_HEADER.size + NONCE_BYTES :]), header + frame(_WRAP_AAD, tenant_id)
            )
        except InvalidTag:
            raise DecryptionError from None

    async def shred(self, tenant_id: str) -> None:
        try:
            await asyncio.to_thread(self._destroy, tenant_id)
        except OSError as exc:
            raise ServiceUnavailableError("the key store is unavailable") from exc

    # -- RotatingKeyProvider --

    async def rotate_kek(self, tenant_ids: Sequence[str]) -> int:
        """Append a new master version to the key file (one KEK change for every tenant)."""
        await self._file_op(self._add_version)
        return len(tenant_ids)

    async def rewrap(self, blob: bytes, *, tenant_id: str) -> bytes:
        await self._file_op(self._refresh)
        if self.kek_version(blob) == self.version:
            return blob
        return await self.wrap(await self.unwrap(blob, tenant_id=tenant_id), tenant_id=tenant_id)

    def kek_version(self, blob: bytes) -> int | None:
        try:
            fmt, version, _key_id = _BLOB_HEADER.unpack_from(blob)
        except (struct.error, TypeError):
            return None
        return int(version) if fmt == _BLOB_FORMAT else None

    async def current_kek_version(self, tenant_id: str) -> int | None:
        await self._file_op(self._refresh)
        return self.version

    async def retire_old_keks(self, tenant_ids: Sequence[str]) -> None:
        """Remove every master version but the current one from the key file.

        "Current" is the version this process last rotated to or read (not re-read here, so that
        what the caller verified is what stays). Only the key file changes: a copy of an old key file (a backup) still holds the retired
        versions, so back the key file up no longer than you keep database backups.
        """
        await self._file_op(self._keep_only, self.version)
