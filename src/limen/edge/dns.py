"""Private DNS at the edge (RFC 8484 semantics on a flow stream).

Two requests, both authenticated with the user's bearer token like every flow:

* ``GET /.well-known/limen/dns-suffixes`` → the private DNS suffixes of every enabled
  application (Quick Access included). The client's stub sends names under them through
  Limen and every other name to the system resolver. The list is the same for every signed-in
  user *on purpose*: a user who is not assigned to an application must still not send its
  private names to a public resolver; the edge refuses them instead (below). The cost is that
  suffix names (not records) are visible to every signed-in user.
* ``POST /dns-query`` with one DNS message → identity checks (``admit``: token, user,
  revocation, device), then the application that owns the longest suffix of the query name;
  an unknown suffix, a disabled application or a user not assigned to it gets a DNS answer
  with RCODE REFUSED and a traffic-log record (transport ``dns``, action ``block``, code
  ``no_dns_suffix`` / ``app_disabled`` / ``not_assigned``). Otherwise the query goes to a
  connector of the application's group, which resolves it on the private side; its answer is
  passed through unchanged. A connector that cannot be reached makes a SERVFAIL answer.

One traffic-log record per query: dest_host is the query name, dest_port 53, bytes are the
query and answer sizes. Conditional-access policies are not evaluated for DNS queries yet
(they are per flow to an application; see docs/architecture.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dns.message
import dns.rcode

from limen.edge.admission import Decision, admit
from limen.edge.snapshot import AppInfo, Snapshot
from limen.errors import RemoteProtocolError
from limen.identity.tokens import TokenVerifier
from limen.ids import new_id
from limen.metrics import FLOWS_TOTAL
from limen.net.endpoints import Endpoint
from limen.net.exchange import exchange, read_body
from limen.net.resolver import error_answer, parse_query
from limen.wire import connect as wire
from limen.wire.doh import encode_dns_answer, encode_dns_query, encode_suffix_list

if TYPE_CHECKING:
    from limen.edge.server import Edge

log = logging.getLogger(__name__)

#: The query body must arrive within this (the client sends head and body in one write).
BODY_TIMEOUT = 10.0
#: How long a client may keep a suffix list before asking again.
SUFFIX_TTL = 60


@dataclass(frozen=True, slots=True)
class SuffixIndex:
    """suffix → the applications that list it (enabled or not), from one snapshot."""

    version: int
    owners: dict[str, tuple[AppInfo, ...]]

    @classmethod
    def build(cls, snapshot: Snapshot) -> SuffixIndex:
        owners: dict[str, list[AppInfo]] = {}
        for app in sorted(snapshot.apps.values(), key=lambda a: (a.kind != "enterprise", a.id)):
            for suffix in app.dns_suffixes:
                owners.setdefault(suffix.strip(".").lower(), []).append(app)
        return cls(snapshot.version, {k: tuple(v) for k, v in owners.items()})

    def suffixes(self) -> list[str]:
        """Suffixes of enabled applications."""
        return sorted(s for s, apps in self.owners.items() if any(a.enabled for a in apps))

    def owners_of(self, name: str) -> tuple[str, tuple[AppInfo, ...]] | None:
        """The longest suffix of ``name`` (a suffix matches itself and every name under it)
        and its owners, or None."""
        labels = name.strip(".").lower().split(".")
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            if suffix in self.owners:
                return suffix, self.owners[suffix]
        return None


_indexes: dict[int, SuffixIndex] = {}


def suffix_index(snapshot: Snapshot) -> SuffixIndex:
    """The index of ``snapshot`` (built once per snapshot object)."""
    key = id(snapshot)
    index = _indexes.get(key)
    if index is None or index.version != snapshot.version:
        _indexes.clear()  # one live snapshot at a time: keep only the newest
        index = _indexes[key] = SuffixIndex.build(snapshot)
    return index


def admit_dns(
    request: wire.FlowRequest,
    qname: str,
    *,
    snapshot: Snapshot,
    verifier: TokenVerifier,
    now: float,
) -> Decision:
    """The decision for one DNS query (pure). Identity checks are :func:`admit`'s: asked with
    protocol ``dns``, which no segment publishes, it stops at ``no_segment`` once the token,
    user, revocation and device checks have passed; any other refusal is returned as is."""
    probe = wire.FlowRequest("dns", qname or "invalid", 53, request.headers)
    decision = admit(probe, snapshot=snapshot, verifier=verifier, now=now)
    if decision.code != "no_segment":
        return decision
    claims = decision.claims
    found = suffix_index(snapshot).owners_of(qname)
    if found is None:
        return Decision(
            "block", 403, "no_dns_suffix", f"no application serves {qname}", claims=claims
        )
    suffix, owners = found
    enabled = [a for a in owners if a.enabled]
    if not enabled:
        return Decision(
            "block", 403, "app_disabled", "the application is disabled", claims=claims,
            app=owners[0],
        )  # fmt: skip
    for app in enabled:
        if claims is not None and claims.sub in snapshot.assigned.get(app.id, frozenset()):
            return Decision("allow", 200, "", "", claims=claims, app=app)
    username = (
        snapshot.users[claims.sub].username if claims and claims.sub in snapshot.users else ""
    )
    return Decision(
        "block",
        403,
        "not_assigned",
        f"user {username} is not assigned to an application serving {suffix}",
        claims=claims,
        app=enabled[0],
    )


async def handle_dns(
    edge: Edge,
    endpoint: Endpoint,
    request: wire.FlowRequest,
    trailing: bytes,
    source: tuple[str, int],
    conn_id: str,
) -> None:
    """Serve a ``dns`` or ``dns-suffixes`` request (see the module docstring)."""
    started = time.time()
    if request.protocol == "dns-suffixes":
        decision = admit_dns(
            request, "", snapshot=edge.snapshot, verifier=edge.verifier, now=started
        )
        if decision.action == "challenge" or decision.code == "device_disabled":
            _refuse_http(endpoint, decision)
            return
        endpoint.write(encode_suffix_list(suffix_index(edge.snapshot).suffixes(), SUFFIX_TTL))
        endpoint.close()
        return
    length = int(request.headers.get("content-length", "0"))
    try:
        body = await read_body(endpoint, length, trailing, BODY_TIMEOUT)
    except (TimeoutError, RemoteProtocolError, ConnectionError) as exc:
        log.info("DNS query from %s:%d: no body (%r)", *source, exc)
        endpoint.abort()
        return
    try:
        query = parse_query(body)
    except RemoteProtocolError as exc:
        endpoint.write(wire.encode_refusal(400, exc.code, str(exc)))
        endpoint.close()
        return
    if len(query.question) != 1:
        _answer(endpoint, error_answer(query, dns.rcode.FORMERR))
        return
    qname = query.question[0].name.to_text(omit_final_dot=True).lower()
    decision = admit_dns(
        request, qname, snapshot=edge.snapshot, verifier=edge.verifier, now=started
    )
    flow_id = new_id("flow")
    named = wire.FlowRequest("dns", qname, 53, request.headers)
    record = edge._record(flow_id, conn_id, started, named, source, decision)
    record.update(transport="dns", bytes_up=len(body))
    if decision.action == "challenge":
        _refuse_http(endpoint, decision)
        _submit(edge, record, decision.action, decision.code, decision.reason)
        return
    if not decision.allowed:
        answer = error_answer(query, dns.rcode.REFUSED)
        _answer(endpoint, answer)
        _submit(edge, record, "block", decision.code, decision.reason, len(answer))
        return
    assert decision.app is not None  # allowed decisions carry their application
    answer = await _forward(edge, decision, record, flow_id, body, query)
    _answer(endpoint, answer)
    record["bytes_down"] = len(answer)
    if record.get("code"):
        _submit(edge, record, "error", str(record["code"]), str(record["reason"]), len(answer))
    else:
        _submit(edge, record, "allow", "", "", len(answer))


async def _forward(
    edge: Edge,
    decision: Decision,
    record: dict[str, object],
    flow_id: str,
    body: bytes,
    query: dns.message.Message,
) -> bytes:
    """Ask a connector of the application's group; SERVFAIL (and the record says why) when
    none answers."""
    assert decision.app is not None and decision.claims is not None
    picked = edge.connectors.pick(decision.app.connector_group_id, edge._loop.time())
    if picked is None:
        record.update(code="no_connector", reason="no connector of the group is connected")
        return error_answer(query, dns.rcode.SERVFAIL)
    link, conn = picked
    record["connector_id"] = link.connector_id
    head = encode_dns_query(
        body, [(wire.HEADER_FLOW_ID, flow_id), (wire.HEADER_USER, decision.claims.sub)]
    )
    link.active_flows += 1
    try:
        response = await exchange(
            conn, head, "POST", wire.MAX_DNS_MESSAGE, edge.settings.connector_dial_timeout
        )
    except TimeoutError:
        link.recent_failures += 1
        record.update(code="connector_timeout", reason="the connector did not answer in time")
        return error_answer(query, dns.rcode.SERVFAIL)
    except (ConnectionError, RemoteProtocolError) as exc:
        link.recent_failures += 1
        record.update(code="connector_unreachable", reason=f"connector failed: {exc}"[:500])
        return error_answer(query, dns.rcode.SERVFAIL)
    finally:
        link.active_flows -= 1
    if not response.ok:
        code, message = response.error()
        record.update(code=code, reason=message[:500])
        return error_answer(query, dns.rcode.SERVFAIL)
    return response.body


def _answer(endpoint: Endpoint, answer: bytes) -> None:
    endpoint.write(encode_dns_answer(answer))
    endpoint.close()


def _refuse_http(endpoint: Endpoint, decision: Decision) -> None:
    headers: list[tuple[str, str]] = []
    if decision.www_authenticate and decision.status == 401:
        headers.append(("WWW-Authenticate", decision.www_authenticate))
    endpoint.write(wire.encode_refusal(decision.status, decision.code, decision.reason, headers))
    endpoint.close()


def _submit(
    edge: Edge,
    record: dict[str, object],
    action: str,
    code: str,
    reason: str,
    bytes_down: int = 0,
) -> None:
    FLOWS_TOTAL.labels(action, code).inc()
    record.update(
        action=action,
        code=code,
        reason=reason,
        bytes_down=bytes_down,
        ended_at=time.time(),
        close_reason="refused" if action in ("block", "challenge") else "target_closed",
    )
    edge.traffic.submit(dict(record))
