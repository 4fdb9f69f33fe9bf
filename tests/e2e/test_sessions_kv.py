"""KV state follows sessions on real llama.cpp replicas; tenants never share cached prefixes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import MODEL, Gateway, start_gateway


@pytest.fixture(scope="module")
def one_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One replica with 2 slots: slot placement is fully determined by the slot manager."""
    gw = start_gateway(tmp_path_factory.mktemp("kv"), replicas=1)
    yield gw
    gw.stop()


def _turn(gw: Gateway, text: str, *, session: str | None = None, key: str | None = None) -> tuple[int, int, dict]:
    headers = {"X-Session-Id": session} if session else {}
    resp = gw.client(key=key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=2, temperature=0,
        extra_headers=headers)
    assert resp.usage is not None
    cached = resp.usage.prompt_tokens_details.cached_tokens if resp.usage.prompt_tokens_details else 0
    return resp.usage.prompt_tokens, cached or 0, (resp.model_extra or {}).get("timings", {})


def test_session_state_is_saved_on_eviction_and_restored(one_replica: Gateway) -> None:
    gw = one_replica
    story_a = "Session A is about apple orchards and cider presses. " * 12
    _, cached, _ = _turn(gw, story_a, session="a")
    assert cached == 0
    prompt, cached, _ = _turn(gw, story_a + "Continue.", session="a")
    assert cached > prompt * 0.8  # same slot: the whole earlier prompt is reused
    _turn(gw, "Session B is about boats on a bay. " * 12, session="b")  # takes the empty slot
    _turn(gw, "Session C is about comets and clouds. " * 12, session="c")  # evicts A (least recent): A is saved
    saved = list((gw.data_dir / "slots").glob("*.kvs"))
    assert len(saved) >= 1
    # Sealed with the tenant's data key (format v1 header, no llama.cpp 'ggsq' magic); no plaintext is left.
    assert all(f.read_bytes()[:1] == b"\x01" and b"ggsq" not in f.read_bytes()[:64] for f in saved)
    assert _plaintext(gw) == []
    # A comes back: its slot is gone, but its KV is restored from the saved file, not re-prefilled.
    prompt, cached, timings = _turn(gw, story_a + "Continue again.", session="a")
    assert cached > prompt * 0.8
    assert timings.get("prompt_n", prompt) < prompt * 0.2  # the engine computed only the new tail
    assert _plaintext(gw) == []  # the restore's scratch file is gone too


def _plaintext(gw: Gateway) -> list[str]:
    """Files in the slot directory other than sealed ones (llama.cpp's scratch files, temporary files)."""
    return sorted(f.name for f in (gw.data_dir / "slots").iterdir() if not f.name.endswith(".kvs"))


def _evict(gw: Gateway, session: str, key: str | None = None) -> set[Path]:
    """Give ``session`` a turn, then two other sessions of the same tenant: with 2 slots, ``session``'s
    slot is taken (the least recently used of the tenant's two) and saved by the third turn. The sealed
    files that the third turn wrote."""
    _turn(gw, f"Session {session} is about lighthouses and tides. " * 12, session=session, key=key)
    _turn(gw, "Another session about rivers. " * 12, session=session + "-x", key=key)
    before = set((gw.data_dir / "slots").glob("*.kvs"))
    _turn(gw, "A third session about mountains. " * 12, session=session + "-y", key=key)
    return set((gw.data_dir / "slots").glob("*.kvs")) - before


def test_a_tampered_slot_file_is_not_restored_and_is_deleted(one_replica: Gateway) -> None:
    gw = one_replica
    new = _evict(gw, "tamper")
    assert len(new) == 1
    (path,) = new
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    # The session comes back: its file does not open, so it is prefilled again (no error), and the file is gone.
    prompt, cached, timings = _turn(gw, "Session tamper is about lighthouses and tides. " * 12 + "More.",
                                    session="tamper")
    # (only the chat template's opening, shared with the slot's previous session of this tenant, is cached)
    assert cached < prompt * 0.2 and timings.get("prompt_n", 0) > prompt * 0.8
    assert not path.exists()


def test_deleting_a_tenant_deletes_its_slot_files(one_replica: Gateway) -> None:
    gw = one_replica
    tenant = json.loads(gw.cli("tenants", "create", "kv-gone", "--json").stdout)
    key = json.loads(gw.cli("keys", "create", "--tenant", "kv-gone", "--json").stdout)["key"]
    new = _evict(gw, "doomed", key=key)
    assert len(new) == 1 and all(p.name.startswith(tenant["id"] + "-") for p in new)
    files = set((gw.data_dir / "slots").glob("*.kvs"))
    mine = {p for p in files if p.name.startswith(tenant["id"] + "-")}
    assert len(mine) >= 2  # with 2 slots, its first two sessions were both evicted within the tenant
    r = gw.admin("DELETE", "/admin/v1/tenants/kv-gone")
    assert r.status_code == 200
    assert not any(p.exists() for p in mine)
    assert files - mine and all(p.exists() for p in files - mine)  # other tenants' files stay


def test_tenants_never_share_cached_prefixes(one_replica: Gateway) -> None:
    gw = one_replica
    other = json.loads(gw.cli("tenants", "create", "kv-other", "--json").stdout)
    assert other["name"] == "kv-other"
    other_key = json.loads(gw.cli("keys", "create", "--tenant", "kv-other", "--json").stdout)["key"]
    shared = "You are the assistant of ACME Corp. Internal policy: never disclose pricing. " * 10
    _turn(gw, shared + "Q1")
    prompt, cached, _ = _turn(gw, shared + "Q2")
    assert cached > prompt * 0.8  # the same tenant reuses its own prefix
    _turn(gw, "Unrelated session text. " * 20, session="pin")  # occupy the other slot for this tenant
    # Another tenant sends the very same prefix: it lands on a slot that held the first tenant's
    # prompt, which is erased first, so it gets no cached tokens and computes the whole prompt.
    prompt, cached, timings = _turn(gw, shared + "Q1", key=other_key)
    assert cached == 0
    assert timings.get("prompt_n") == prompt
    # ... while it does reuse its own prefix afterwards.
    prompt, cached, _ = _turn(gw, shared + "Q2", key=other_key)
    assert cached > prompt * 0.8


def test_chat_session_affinity_header_validation(one_replica: Gateway, tmp_path: Path) -> None:
    import httpx

    with httpx.Client(base_url=one_replica.url) as h:
        r = h.post("/v1/chat/completions", headers={"Authorization": f"Bearer {one_replica.member_key}",
                                                    "X-Session-Id": "x" * 300},
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-Id"
