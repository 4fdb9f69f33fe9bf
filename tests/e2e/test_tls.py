"""TLS on the gateway: `skyfleet certs dev`, HTTPS with the SDK, TLS 1.2 minimum, plain HTTP refused."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import MODEL, start_gateway


def test_dev_certs_and_https_gateway(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    done = subprocess.run([sys.executable, "-m", "skyfleet", "certs", "dev", "--out", str(certs)],
                          capture_output=True, text=True, check=True, timeout=60)
    assert "server.pem" in done.stdout
    for key in ("server.key", "client.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    ca = certs / "ca.pem"
    gw = start_gateway(tmp_path / "gw", replicas=1, tls_ca=ca, tls_cert=str(certs / "server.pem"),
                       tls_key=str(certs / "server.key"))
    try:
        assert gw.url.startswith("https://")
        resp = gw.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=3)
        assert resp.choices[0].message.content is not None
        # Plain HTTP to the TLS port gets no answer.
        with pytest.raises(httpx.HTTPError):
            httpx.get(gw.url.replace("https://", "http://") + "/healthz", timeout=5)
        # TLS 1.2 works; TLS 1.1 and older are refused.
        tls12 = ssl.create_default_context(cafile=str(ca))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert httpx.get(gw.url + "/healthz", verify=tls12, timeout=5).status_code == 200
        old = ssl.create_default_context(cafile=str(ca))
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises((httpx.HTTPError, ssl.SSLError)):
            httpx.get(gw.url + "/healthz", verify=old, timeout=5)
        # A client that does not trust the dev CA refuses the certificate.
        with pytest.raises(httpx.ConnectError):
            httpx.get(gw.url + "/healthz", timeout=5)
    finally:
        assert gw.stop(timeout_s=15) == 0  # idle TLS keep-alive connections do not hold the shutdown


def test_tls_settings_are_validated(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SKYFLEET_TLS_CERT": str(tmp_path / "missing.pem")}
    r = subprocess.run([sys.executable, "-m", "skyfleet", "tenants", "list"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "tls_cert and tls_key go together" in r.stderr
