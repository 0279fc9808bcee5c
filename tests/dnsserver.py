"""A tiny authoritative DNS server for tests, built on dnspython (UDP and TCP on loopback).

Zone data is a dict of ``(name, type) → [rdata text]``; names under ``zone`` that are not in
it get NXDOMAIN (with the zone's SOA), ``servfail`` names get SERVFAIL, names outside the zone
REFUSED. Every query is counted per name so a test can tell a cache hit from a miss.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class TinyDns(asyncio.DatagramProtocol):
    def __init__(
        self,
        zone: str,
        records: dict[tuple[str, str], list[str]],
        *,
        ttl: int = 300,
        servfail: tuple[str, ...] = (),
    ) -> None:
        self.zone = dns.name.from_text(zone)
        self.records = {
            (dns.name.from_text(n), dns.rdatatype.from_text(t)): v for (n, t), v in records.items()
        }
        self.ttl = ttl
        self.servfail = {dns.name.from_text(n) for n in servfail}
        self.queries: Counter[str] = Counter()
        self.transport: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> TinyDns:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # the UDP port the kernel picks may be taken over TCP
            await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
            assert self.transport is not None
            self.port = self.transport.get_extra_info("sockname")[1]
            try:
                self.tcp = await asyncio.start_server(self._on_tcp, "127.0.0.1", self.port)
                return self
            except OSError:
                self.transport.close()
        raise OSError("no port free for both UDP and TCP")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.tcp is not None:
            self.tcp.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        answer = self.answer(data)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            answer = self.answer(await reader.readexactly(size))
            if answer is not None:
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def answer(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:  # junk: no answer
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        self.queries[name.to_text(omit_final_dot=True)] += 1
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif not name.is_subdomain(self.zone):
            response.set_rcode(dns.rcode.REFUSED)
        else:
            self._fill(response, name, rdtype)
        return response.to_wire()

    def _fill(self, response: dns.message.Message, name: dns.name.Name, rdtype: int) -> None:
        known = {n for n, _t in self.records}
        cname = self.records.get((name, dns.rdatatype.CNAME))
        if cname and rdtype != dns.rdatatype.CNAME:
            response.answer.append(dns.rrset.from_text_list(name, self.ttl, "IN", "CNAME", cname))
            name = dns.name.from_text(cname[0])
        values = self.records.get((name, dns.rdatatype.RdataType(rdtype)))
        if values:
            rtype = dns.rdatatype.to_text(dns.rdatatype.RdataType(rdtype))
            response.answer.append(dns.rrset.from_text_list(name, self.ttl, "IN", rtype, values))
            return
        soa = dns.rrset.from_text(
            self.zone, self.ttl, "IN", "SOA", f"ns.{self.zone} admin.{self.zone} 1 60 60 600 30"
        )
        response.authority.append(soa)
        if name not in known:
            response.set_rcode(dns.rcode.NXDOMAIN)
