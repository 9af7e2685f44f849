"""A real authoritative DNS server on loopback, serving zones a test builds with dnspython.

The resolver under test is pointed at it through ``config/dns.ini``, as an operator would
point harakapy at their resolver. Names in ``servfail`` answer SERVFAIL, as a broken
upstream does.
"""

from __future__ import annotations

import asyncio

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.zone


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self, zone_text: str, origin: str = "test.") -> None:
        self.zone = dns.zone.from_text(zone_text, origin=origin, relativize=False,
                                       check_origin=False)
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> DnsServer:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self,
                                                                local_addr=(host, 0))
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        response = self.answer(query)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(max_size=65535), addr)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        self.queries.append((name.to_text(omit_final_dot=True).lower(),
                             dns.rdatatype.to_text(rdtype)))
        if name.to_text(omit_final_dot=True).lower() in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        # Follow CNAMEs inside our zone, as a recursive resolver would hand them back.
        for _ in range(8):
            node = self.zone.get_node(name)
            if node is None:
                if not response.answer:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return response
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is not None and rdtype != dns.rdatatype.CNAME:
                response.answer.append(_rrset(name, cname))
                name = cname[0].target
                continue
            rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rdataset is not None:
                response.answer.append(_rrset(name, rdataset))
            return response
        return response


def _rrset(name: dns.name.Name, rdataset) -> dns.rrset.RRset:
    import dns.rrset

    rrset = dns.rrset.RRset(name, rdataset.rdclass, rdataset.rdtype)
    rrset.update(rdataset)
    return rrset
