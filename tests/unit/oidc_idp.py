"""A real local OpenID provider for tests: an HTTP server with discovery and a JWKS, and token minting.

Keys are made with ``cryptography``; tokens are signed with PyJWT (or by hand, for forgeries PyJWT
refuses to make).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "skyfleet-test"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Idp:
    """Serves ``/.well-known/openid-configuration`` and ``/jwks.json``; counts JWKS fetches."""

    rsa_key: Any = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    #: kid -> private key of the keys currently published.
    published: dict[str, Any] = field(default_factory=dict)
    jwks_hits: int = 0
    issuer_override: str | None = None
    _server: ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        self.published = {"rsa1": self.rsa_key, "ec1": self.ec_key}

    @property
    def issuer(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.published.items():
            if isinstance(key, rsa.RSAPrivateKey):
                jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "RS256"}
            else:
                jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True) | {"alg": "ES256"}
            keys.append(jwk | {"kid": kid, "use": "sig"})
        return {"keys": keys}

    def start(self) -> Idp:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": idp.issuer_override or idp.issuer, "jwks_uri": idp.issuer + "/jwks.json"}
                elif self.path == "/jwks.json":
                    idp.jwks_hits += 1
                    body = idp.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def claims(self, now: float | None = None, **overrides: Any) -> dict[str, Any]:
        now = time.time() if now is None else now
        base = {"iss": self.issuer, "aud": AUDIENCE, "sub": "user-1", "iat": int(now), "exp": int(now) + 300,
                "skyfleet_tenant": "acme"}
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def token(self, claims: dict[str, Any] | None = None, *, kid: str = "rsa1", key: Any = None,
              alg: str | None = None) -> str:
        key = key if key is not None else self.published[kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(claims if claims is not None else self.claims(), key, algorithm=alg, headers={"kid": kid})

    def unsigned_token(self, claims: dict[str, Any]) -> str:
        header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa1"}).encode())
        return f"{header}.{_b64(json.dumps(claims).encode())}."

    def hs256_with_public_key(self, claims: dict[str, Any]) -> str:
        """The classic confusion attack: HMAC keyed with the (public) RSA key's PEM."""
        pem = self.rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = (_b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}).encode()) + "." +
                         _b64(json.dumps(claims).encode()))
        sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(sig)}"
