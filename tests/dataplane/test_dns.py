"""Component tests of private DNS: the whole service on loopback, a connector whose resolver is
a tiny DNS server for corp.example, the client's stub in front of another tiny server standing
in for the public resolver. Real DNS queries (dnspython) against the stub, over UDP and TCP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from sqlalchemy import select

from limen.client.dns import DnsStub
from limen.net.resolver import DnsResolver, Upstream
from limen.store.models import TrafficRecord
from tests.dnsserver import TinyDns
from tests.support import Tenant, running_tenant

PRIVATE = {
    ("www.corp.example", "A"): ["10.1.2.3"],
    ("www.corp.example", "AAAA"): ["fd00::5"],
    ("alias.corp.example", "CNAME"): ["www.corp.example."],
    ("corp.example", "TXT"): ['"v=private"'],
    ("_ldap._tcp.corp.example", "SRV"): ["0 5 389 dc1.corp.example."],
    ("dc1.corp.example", "A"): ["10.1.2.10"],
}


@pytest.fixture
async def tenant(tmp_path: Path) -> Any:
    async with running_tenant(tmp_path) as t:
        yield t


@pytest.fixture
async def private_dns() -> Any:
    server = TinyDns("corp.example", PRIVATE, ttl=300, servfail=("broken.corp.example",))
    await server.start()
    yield server
    server.close()


@pytest.fixture
async def public_dns() -> Any:
    server = await TinyDns("public.test", {("host.public.test", "A"): ["192.0.2.7"]}).start()
    yield server
    server.close()


async def _setup(tenant: Tenant, private_dns: TinyDns) -> None:
    alice = await tenant.user("alice")
    await tenant.user("mallory")
    group = await tenant.default_group()
    app = await tenant.call(
        "POST",
        "/api/v1/apps",
        {"name": "corp-dns", "connector_group_id": group, "dns_suffixes": ["corp.example"]},
    )
    await tenant.call(
        "POST", f"/api/v1/apps/{app['id']}/assignments", {"principal_id": alice["id"]}
    )
    agent = await tenant.connector()
    agent.dns = DnsResolver([Upstream("127.0.0.1", private_dns.port)], timeout=1.0)
    await tenant.wait_edge_sees(
        lambda e: any("corp.example" in a.dns_suffixes for a in e.snapshot.apps.values())
    )


async def _stub(tenant: Tenant, user: str, public_dns: TinyDns) -> tuple[DnsStub, int]:
    session = await tenant.login(user)
    stub = DnsStub(session, upstream=DnsResolver([Upstream("127.0.0.1", public_dns.port)]))
    bound = await stub.start("127.0.0.1", 0)
    return stub, int(bound[1])


async def _ask(port: int, name: str, rdtype: str, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=port, timeout=10)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)


async def _dns_records(tenant: Tenant, n: int) -> list[TrafficRecord]:
    assert tenant.service.ctx is not None
    store = tenant.service.ctx.store
    rows: list[TrafficRecord] = []
    for _ in range(500):  # bounded: the writer flushes every 50 ms in tests
        with store.session() as s:
            rows = [r for r in s.scalars(select(TrafficRecord)) if r.transport == "dns"]
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} dns records, found {len(rows)}")


def _texts(answer: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in answer.answer for rd in rrset}


async def test_private_names_resolve_through_limen_faithfully(
    tenant: Tenant, private_dns: TinyDns, public_dns: TinyDns
) -> None:
    await _setup(tenant, private_dns)
    stub, port = await _stub(tenant, "alice", public_dns)
    assert stub.suffixes == ["corp.example"]

    a = await _ask(port, "www.corp.example", "A")
    assert a.rcode() == dns.rcode.NOERROR and _texts(a) == {"10.1.2.3"}
    aaaa = await _ask(port, "www.corp.example", "AAAA")
    assert _texts(aaaa) == {"fd00::5"}
    cname = await _ask(port, "alias.corp.example", "A")
    assert _texts(cname) == {"www.corp.example.", "10.1.2.3"}
    txt = await _ask(port, "corp.example", "TXT")
    assert _texts(txt) == {'"v=private"'}
    srv = await _ask(port, "_ldap._tcp.corp.example", "SRV", tcp=True)
    assert _texts(srv) == {"0 5 389 dc1.corp.example."}
    missing = await _ask(port, "missing.corp.example", "A")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    broken = await _ask(port, "broken.corp.example", "A")
    assert broken.rcode() == dns.rcode.SERVFAIL

    # The connector's cache answers a repeat (the private server saw the name once).
    again = await _ask(port, "www.corp.example", "A")
    assert _texts(again) == {"10.1.2.3"}
    assert private_dns.queries["www.corp.example"] == 2  # A and AAAA; the repeat was cached
    assert 0 < again.answer[0].ttl <= 300

    # A public name goes to the public resolver, never through the tunnel.
    public = await _ask(port, "host.public.test", "A")
    assert _texts(public) == {"192.0.2.7"}
    assert private_dns.queries["host.public.test"] == 0
    assert public_dns.queries["host.public.test"] == 1

    rows = await _dns_records(tenant, 8)
    assert all(r.dest_host.endswith("corp.example") for r in rows)
    allowed = [r for r in rows if r.action == "allow"]
    assert {r.dest_host for r in allowed} >= {"www.corp.example", "missing.corp.example"}
    assert all(r.username == "alice" and r.dest_port == 53 for r in allowed)
    assert all(r.connector_id.startswith("con_") and r.bytes_down > 0 for r in allowed)
    stub.close()
    await stub.session.close()


async def test_unassigned_user_gets_refused_and_it_is_logged(
    tenant: Tenant, private_dns: TinyDns, public_dns: TinyDns
) -> None:
    await _setup(tenant, private_dns)
    stub, port = await _stub(tenant, "mallory", public_dns)
    # Every signed-in user learns the suffixes, so the name never leaks to a public resolver.
    assert stub.suffixes == ["corp.example"]
    refused = await _ask(port, "www.corp.example", "A")
    assert refused.rcode() == dns.rcode.REFUSED
    assert refused.answer == []
    assert private_dns.queries["www.corp.example"] == 0
    assert public_dns.queries["www.corp.example"] == 0
    rows = await _dns_records(tenant, 1)
    assert rows[0].action == "block" and rows[0].code == "not_assigned"
    assert rows[0].username == "mallory" and rows[0].dest_host == "www.corp.example"
    stub.close()
    await stub.session.close()


async def test_bad_dns_input_is_refused_and_the_stub_keeps_serving(
    tenant: Tenant, private_dns: TinyDns, public_dns: TinyDns
) -> None:
    from limen.client.dns import edge_request

    await _setup(tenant, private_dns)
    stub, port = await _stub(tenant, "alice", public_dns)
    # Junk to the stub over UDP: dropped, not answered, not fatal.
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port)
    )
    transport.sendto(b"\x00" * 5)
    transport.sendto(b"\xff" * 40)
    transport.close()
    # A malformed DNS message sent straight to the edge: an HTTP refusal with a code.
    response = await edge_request(stub.session, [], "POST", b"\x00" * 12 + b"\xff" * 8)
    assert response.status == 400 and response.error()[0] == "dns_malformed"
    a = await _ask(port, "www.corp.example", "A")
    assert _texts(a) == {"10.1.2.3"}
    stub.close()
    await stub.session.close()
