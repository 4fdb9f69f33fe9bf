"""Client networks: CIDR parsing, the client address behind trusted proxies, and keys' CIDR allow-lists."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skyfleet.iam.cidr import admitted, client_address, normalise_cidr, parse_address, parse_networks
from tests.unit.iam_app import bearer, in_process_app

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
any_ip = ipv4 | ipv6
TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])
trusted_ip = st.builds(lambda n: ipaddress.ip_address(0x0A000000 + n), st.integers(0, 2**24 - 1))
untrusted_ip = any_ip.filter(lambda a: not admitted(a, TRUSTED) and getattr(a, "ipv4_mapped", None) is None)


@given(any_ip, st.integers(0, 128))
def test_normalise_cidr_is_canonical_and_idempotent(addr: ipaddress._BaseAddress, prefix: int) -> None:
    prefix = min(prefix, addr.max_prefixlen)
    net = normalise_cidr(f"{addr}/{prefix}")
    assert normalise_cidr(net) == net
    if getattr(addr, "ipv4_mapped", None) is None:
        assert ipaddress.ip_network(net, strict=True) == ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


@pytest.mark.parametrize("bad", ["", "10.0.0.0/33", "banana", "10.0.0", "::g", "1.2.3.4/8/9", "x" * 100])
def test_normalise_cidr_rejects_junk(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_cidr(bad)


def test_ipv4_mapped_addresses_match_ipv4_networks() -> None:
    assert admitted(parse_address("::ffff:10.1.2.3"), parse_networks(["10.0.0.0/8"]))
    assert normalise_cidr("::ffff:10.0.0.0/104") == "10.0.0.0/8"


@given(any_ip, st.lists(any_ip, max_size=4))
def test_without_trusted_proxies_the_peer_is_the_client(peer, hops) -> None:
    xff = ", ".join(map(str, hops))
    assert client_address(str(peer), xff, ()) == parse_address(str(peer))


@given(untrusted_ip, st.lists(any_ip, max_size=4))
def test_an_untrusted_peer_cannot_set_the_address(peer, hops) -> None:
    assert client_address(str(peer), ", ".join(map(str, hops)), TRUSTED) == parse_address(str(peer))


@given(st.lists(any_ip, max_size=3), untrusted_ip, st.lists(trusted_ip, max_size=3), trusted_ip)
def test_behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client(spoofed, client, proxies, peer) -> None:
    # The client may write anything to the left of its own hop; the proxies append to the right.
    xff = ",".join(str(a) for a in [*spoofed, client, *proxies])
    assert client_address(str(peer), xff, TRUSTED) == client


@given(st.lists(trusted_ip, min_size=1, max_size=4), trusted_ip)
def test_all_hops_trusted_gives_the_left_most(hops, peer) -> None:
    assert client_address(str(peer), ", ".join(map(str, hops)), TRUSTED) == hops[0]


@pytest.mark.parametrize("xff", ["1.2.3.4, junk", "junk", "1.2.3.4,,", ",".join(["1.1.1.1"] * 40)])
def test_malformed_forwarded_for_from_a_proxy_fails_closed(xff: str) -> None:
    addr = client_address("10.0.0.1", xff, TRUSTED)
    assert addr is None and not admitted(addr, parse_networks(["0.0.0.0/0", "::/0"]))


@given(any_ip, st.lists(any_ip, min_size=1, max_size=4), st.integers(0, 32))
def test_admitted_agrees_with_ipaddress(addr, bases, prefix) -> None:
    nets = parse_networks(f"{b}/{min(prefix, b.max_prefixlen)}" for b in bases)
    assert admitted(addr, nets) == any(addr.version == n.version and addr in n for n in nets)


async def test_key_cidr_allow_list_end_to_end_in_process(tmp_path: Path) -> None:
    async with in_process_app(tmp_path, trusted_proxies=["127.0.0.1/32"]) as app:
        key, _ = await app.gw.store.keys.create("acme", cidrs=["10.0.0.0/8", "2001:db8::/32"])
        unknown = bearer("sk-sf-" + "Q" * 43)
        async def status(client: tuple[str, int], headers: dict[str, str]) -> tuple[int, bytes]:
            async with app.http(client) as h:
                r = await h.get("/v1/models", headers=headers)
                return r.status_code, r.content

        refused = await status(("127.0.0.1", 1), unknown)
        assert refused[0] == 401
        assert await status(("10.2.3.4", 1), bearer(key)) == (200, (await status(("10.2.3.4", 1), bearer(key)))[1])
        assert (await status(("2001:db8::7", 1), bearer(key)))[0] == 200
        # Refused from elsewhere with exactly the bad-key answer (nothing says why).
        assert await status(("192.168.1.1", 1), bearer(key)) == refused
        # A trusted proxy (127.0.0.1) vouches for the right-most untrusted hop...
        assert (await status(("127.0.0.1", 1), {**bearer(key), "X-Forwarded-For": "10.9.9.9"}))[0] == 200
        assert await status(("127.0.0.1", 1), {**bearer(key), "X-Forwarded-For": "10.9.9.9, 8.8.8.8"}) == refused
        assert await status(("127.0.0.1", 1), {**bearer(key), "X-Forwarded-For": "not-an-ip"}) == refused
        # ...an untrusted peer does not.
        assert await status(("192.168.1.1", 1), {**bearer(key), "X-Forwarded-For": "10.9.9.9"}) == refused
        # A key without an allow-list works from anywhere.
        assert (await status(("192.168.1.1", 1), bearer(app.keys["member"])))[0] == 200
