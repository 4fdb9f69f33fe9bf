"""The README's first command: `make serve` reaches ready and answers a chat completion."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.harness import MODEL, start_gateway, wait_until


def test_make_serve(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, via_make=True)
    try:
        wait_until(lambda: "API key" in gw.keys, 10, what="the bootstrap key printed by make serve")
        resp = gw.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
        assert resp.choices[0].message.content
        assert len(gw.replicas()) == 2  # the default: two llama.cpp replicas
    finally:
        gw.stop()
