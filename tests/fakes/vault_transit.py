"""A fake of HashiCorp Vault's Transit secrets engine HTTP API, for tests (no Vault binary here).

It follows the documented API (https://developer.hashicorp.com/vault/api-docs/secret/transit) and
the server's answers as Vault's transit backend writes them, for what skyfleet uses:

=======================================  ==============================================================
``POST   /v1/<mount>/keys/:name``        create (``type`` aes256-gcm96 only, ``derived``); an existing
                                         key is left as is (200 + warning "key X already existed")
``GET    /v1/<mount>/keys/:name``        read: ``latest_version``, ``min_decryption_version``, ...;
                                         404 ``{"errors": []}`` if there is no such key
``DELETE /v1/<mount>/keys/:name``        204; 400 unless ``deletion_allowed`` was set in the config
``POST   /v1/<mount>/keys/:name/config`` ``min_decryption_version``, ``min_encryption_version``,
                                         ``deletion_allowed``; 204
``POST   /v1/<mount>/keys/:name/rotate`` a new key version; 204
``POST   /v1/<mount>/encrypt/:name``     base64 ``plaintext`` (and ``context`` for derived keys) ->
                                         ``vault:v<N>:<base64(nonce || ciphertext || tag)>``; upserts
                                         a missing key, as Vault does for a token with ``create``
``POST   /v1/<mount>/decrypt/:name``     -> base64 ``plaintext``; 400 for a bad or too-old ciphertext,
                                         a wrong context, or a missing key
``POST   /v1/<mount>/rewrap/:name``      decrypt + encrypt under the latest version, inside the server
=======================================  ==============================================================

Every request needs ``X-Vault-Token`` (403 ``{"errors": ["permission denied"]}`` otherwise); keys
live per ``X-Vault-Namespace``. Errors are ``{"errors": [...]}`` with Vault's status codes (400,
403, 404, 405). The cryptography is real (AES-256-GCM, per-version random keys; derived keys via
HKDF from the context: Vault uses an HMAC-SHA256 counter KDF, which only matters inside Vault).
``fail_next`` makes the next requests answer a given status (429, 500, 503) to test error paths.
Served by ``http.server`` in a thread, on 127.0.0.1, optionally over TLS.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.fakes.http_server import FakeHttpServer

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.@-]*"
_DERIVED_WITHOUT_CONTEXT = (
    "missing 'context' for key derivation; the key was created using a derived key, which means additional, "
    "per-request information must be included in order to perform operations with the key"
)



class VaultError(Exception):
    def __init__(self, status: int, *errors: str) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = list(errors)


@dataclass
class TransitKey:
    name: str
    derived: bool
    versions: dict[int, bytes] = field(default_factory=dict)
    created: dict[int, int] = field(default_factory=dict)
    min_decryption_version: int = 1
    min_encryption_version: int = 0
    deletion_allowed: bool = False

    @property
    def latest_version(self) -> int:
        return max(self.versions)

    def rotate(self) -> None:
        version = max(self.versions, default=0) + 1
        self.versions[version] = AESGCM.generate_key(bit_length=256)
        self.created[version] = int(time.time())

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": "aes256-gcm96",
            "derived": self.derived,
            "deletion_allowed": self.deletion_allowed,
            "exportable": False,
            "allow_plaintext_backup": False,
            "latest_version": self.latest_version,
            "min_available_version": 0,
            "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": self.min_encryption_version,
            "supports_encryption": True,
            "supports_decryption": True,
            "supports_derivation": True,
            "supports_signing": False,
            "auto_rotate_period": 0,
            "imported_key": False,
            "keys": {str(v): t for v, t in self.created.items()},
            **({"kdf": "hkdf_sha256", "convergent_encryption": False} if self.derived else {}),
        }

    def _aead(self, version: int, context: bytes | None) -> AESGCM:
        key = self.versions[version]
        if self.derived:
            if not context:
                raise VaultError(400, _DERIVED_WITHOUT_CONTEXT)
            key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(key)
        return AESGCM(key)

    def encrypt(self, plaintext: bytes, context: bytes | None) -> tuple[str, int]:
        version = self.latest_version
        if self.min_encryption_version and version < self.min_encryption_version:
            raise VaultError(400, "requested version for encryption is less than the minimum encryption key version")
        nonce = os.urandom(12)
        sealed = self._aead(version, context).encrypt(nonce, plaintext, None)
        return f"vault:v{version}:{base64.b64encode(nonce + sealed).decode()}", version

    def decrypt(self, ciphertext: str, context: bytes | None) -> bytes:
        if not ciphertext.startswith("vault:"):
            raise VaultError(400, "invalid ciphertext: no prefix")
        parts = ciphertext.split(":", 2)
        if len(parts) != 3 or not parts[1].startswith("v"):
            raise VaultError(400, "invalid ciphertext: wrong number of fields")
        try:
            version = int(parts[1][1:])
        except ValueError:
            raise VaultError(400, "invalid ciphertext: version number could not be decoded") from None
        if version > self.latest_version:
            raise VaultError(400, "invalid ciphertext: version is too new")
        if version < self.min_decryption_version or version not in self.versions:
            raise VaultError(400, "ciphertext or signature version is disallowed by policy (too old)")
        try:
            raw = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            raise VaultError(400, "invalid ciphertext: could not decode base64") from None
        if len(raw) < 12 + 16:
            raise VaultError(400, "invalid ciphertext: too short")
        try:
            return self._aead(version, context).decrypt(raw[:12], raw[12:], None)
        except InvalidTag:
            raise VaultError(400, "cipher: message authentication failed") from None


def _b64(body: dict[str, Any], name: str, what: str) -> bytes | None:
    value = body.get(name)
    if value in (None, ""):
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(400, f"failed to base64-decode {what}") from None


class FakeVaultTransit(FakeHttpServer):
    """The fake server; ``with FakeVaultTransit(token=...) as vault: vault.url``."""

    def __init__(self, *, token: str, mount: str = "transit", tls: tuple[Path, Path] | None = None) -> None:
        self.token = token
        self.mount = mount.strip("/")
        self.keys: dict[tuple[str, str], TransitKey] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, namespace)
        self.fail_next: list[int] = []
        self._lock = threading.Lock()
        super().__init__(name="fake-vault", tls=tls)

    def key(self, name: str, namespace: str = "") -> TransitKey | None:
        with self._lock:
            return self.keys.get((namespace, name))

    # -- HTTP --

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        path = handler.path.split("?", 1)[0]
        namespace = handler.headers.get("X-Vault-Namespace", "").strip("/")
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((method, path, namespace))
            injected = self.fail_next.pop(0) if self.fail_next else None
        try:
            if injected is not None:
                raise VaultError(injected, "injected failure")
            if handler.headers.get("X-Vault-Token") != self.token:
                raise VaultError(403, "permission denied")
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                raise VaultError(400, "failed to parse JSON input") from None
            if not isinstance(body, dict):
                raise VaultError(400, "failed to parse JSON input")
            with self._lock:
                status, answer = self._route(method, path, namespace, body)
        except VaultError as exc:
            status, answer = exc.status, {"errors": exc.errors}
        payload = b"" if status == 204 else json.dumps(answer).encode()
        handler.send_response(status)
        if payload:
            handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _route(self, method: str, path: str, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        prefix = f"/v1/{self.mount}/"
        if not path.startswith(prefix):
            raise VaultError(404, "1 error occurred:\n\t* unsupported path\n\n")
        rest = path[len(prefix):]
        for pattern, methods, fn in (
            (rf"keys/({_NAME})", ("POST", "PUT", "GET", "DELETE"), self._keys),
            (rf"keys/({_NAME})/config", ("POST", "PUT"), self._config),
            (rf"keys/({_NAME})/rotate", ("POST", "PUT"), self._rotate),
            (rf"encrypt/({_NAME})", ("POST", "PUT"), self._encrypt),
            (rf"decrypt/({_NAME})", ("POST", "PUT"), self._decrypt),
            (rf"rewrap/({_NAME})", ("POST", "PUT"), self._rewrap),
        ):
            found = re.fullmatch(pattern, rest)
            if found:
                if method not in methods:
                    raise VaultError(405, "1 error occurred:\n\t* unsupported operation\n\n")
                return fn(method, namespace, found.group(1), body)
        raise VaultError(404, "1 error occurred:\n\t* unsupported path\n\n")

    def _create(self, namespace: str, name: str, derived: bool) -> TransitKey:
        key = TransitKey(name=name, derived=derived)
        key.rotate()
        self.keys[(namespace, name)] = key
        return key

    def _keys(self, method: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        key = self.keys.get((namespace, name))
        if method == "GET":
            if key is None:
                raise VaultError(404)
            return 200, {"data": key.info()}
        if method == "DELETE":
            if key is None:
                raise VaultError(400, f"error deleting policy {name}: could not delete key; not found")
            if not key.deletion_allowed:
                raise VaultError(400, f"error deleting policy {name}: deletion is not allowed for this key")
            del self.keys[(namespace, name)]
            return 204, {}
        key_type = body.get("type", "aes256-gcm96")
        if key_type != "aes256-gcm96":
            raise VaultError(400, f"unknown key type {key_type} (the fake supports aes256-gcm96 only)")
        if body.get("convergent_encryption"):
            raise VaultError(400, "convergent encryption is not supported by the fake")
        warnings = None
        if key is None:
            key = self._create(namespace, name, bool(body.get("derived", False)))
        else:
            warnings = [f"key {name} already existed"]
        return 200, {"data": key.info(), "warnings": warnings}

    def _existing(self, namespace: str, name: str, missing: str) -> TransitKey:
        key = self.keys.get((namespace, name))
        if key is None:
            raise VaultError(400, missing)
        return key

    def _config(self, method: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        key = self._existing(namespace, name, f"no existing key named {name} could be found")
        if "min_decryption_version" in body:
            version = int(body["min_decryption_version"])
            if version > key.latest_version:
                raise VaultError(400, f"cannot set min decryption version of {version}, latest key version is "
                                      f"{key.latest_version}")
            if version > 0:
                key.min_decryption_version = version
        if "min_encryption_version" in body:
            version = int(body["min_encryption_version"])
            if version > key.latest_version:
                raise VaultError(400, f"cannot set min encryption version of {version}, latest key version is "
                                      f"{key.latest_version}")
            key.min_encryption_version = version
        if "deletion_allowed" in body:
            key.deletion_allowed = bool(body["deletion_allowed"])
        return 204, {}

    def _rotate(self, method: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._existing(namespace, name, "key not found").rotate()
        return 204, {}

    def _encrypt(self, method: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if "plaintext" not in body:
            raise VaultError(400, "missing plaintext to encrypt")
        plaintext = _b64(body, "plaintext", "plaintext") or b""
        context = _b64(body, "context", "context")
        key = self.keys.get((namespace, name))
        if key is None:  # upsert, as for a token with the create capability
            key = self._create(namespace, name, derived=context is not None)
        ciphertext, version = key.encrypt(plaintext, context)
        return 200, {"data": {"ciphertext": ciphertext, "key_version": version}}

    def _decrypt(self, method: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ciphertext = str(body.get("ciphertext") or "")
        if not ciphertext:
            raise VaultError(400, "missing ciphertext to decrypt")
        key = self._existing(namespace, name, "encryption key not found")
        plaintext = key.decrypt(ciphertext, _b64(body, "context", "context"))
        return 200, {"data": {"plaintext": base64.b64encode(plaintext).decode()}}

    def _rewrap(self, method: str, namespace: str, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ciphertext = str(body.get("ciphertext") or "")
        if not ciphertext:
            raise VaultError(400, "missing ciphertext to decrypt")
        key = self._existing(namespace, name, "encryption key not found")
        context = _b64(body, "context", "context")
        fresh, version = key.encrypt(key.decrypt(ciphertext, context), context)
        return 200, {"data": {"ciphertext": fresh, "key_version": version}}
