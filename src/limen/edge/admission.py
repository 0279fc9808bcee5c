"""Flow admission: the decision for one new flow. Pure — no I/O, no clock (``now`` is
passed in) — so every allow and refusal path is a table-driven test.

Order of checks (each refusal says which one failed): bearer token present → token valid
(signature, issuer, audience, lifetime) → user known and enabled → token not older than the
user's revocation time (continuous access evaluation) → with strict enforcement, the flow
comes from the token's ``ipaddr`` → the token's device, if any, is
enabled → a segment publishes the destination → its application is enabled → the user is
assigned to it → conditional-access policies (block → 403; a missing factor or a too-old
sign-in → 401 step-up challenge, RFC 9470).
"""

from __future__ import annotations

import base64
import ipaddress
import json
from dataclasses import dataclass

from limen.edge.snapshot import AppInfo, Snapshot
from limen.errors import AuthError
from limen.identity.tokens import AccessClaims, TokenVerifier
from limen.policy.conditional import EvaluationContext, PolicyDecision
from limen.policy.segments import SegmentSpec
from limen.wire.connect import FlowRequest


@dataclass(frozen=True, slots=True)
class Decision:
    #: allow | block | challenge
    action: str
    status: int = 200
    code: str = ""
    reason: str = ""
    claims: AccessClaims | None = None
    app: AppInfo | None = None
    segment: SegmentSpec | None = None
    www_authenticate: str | None = None
    #: policies that applied (enforced first, then report-only as ``id:would-decide``)
    policy_ids: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


def claims_challenge(
    revoked_at: float, description: str = "access was revoked; sign in again"
) -> str:
    """Entra's CAE claims challenge: the client must bring a token issued after
    ``revoked_at`` (``nbf``)."""
    claims = {"access_token": {"nbf": {"essential": True, "value": str(int(revoked_at))}}}
    encoded = base64.b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode()
    return (
        'Bearer realm="limen", error="insufficient_claims", '
        f'error_description="{_quote(description)}", claims="{encoded}"'
    )


#: The refusal code of a flow whose source differs from its token's ``ipaddr`` (strict
#: enforcement). The client answers it by refreshing: its new token carries its new address.
ADDRESS_MISMATCH = "address_mismatch"
ADDRESS_MISMATCH_REASON = "token used from another address"


def same_address(a: str, b: str) -> bool:
    """Whether two textual IP addresses are the same host (an IPv4-mapped IPv6 address
    equals its IPv4 form). Unparseable or empty addresses never match: fail closed."""
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y


def _challenge(code: str, reason: str, header: str, claims: AccessClaims | None = None) -> Decision:
    return Decision("challenge", 401, code, reason, claims=claims, www_authenticate=header)


def step_up_challenge(decision: PolicyDecision) -> str:
    """RFC 9470 §3: the client must come back with a stronger or fresher sign-in."""
    parts = [
        'Bearer realm="limen"',
        'error="insufficient_user_authentication"',
        f'error_description="{_quote(decision.reason)}"',
    ]
    if decision.acr_values:
        parts.append(f'acr_values="{decision.acr_values}"')
    if decision.max_age is not None:
        parts.append(f'max_age="{decision.max_age}"')
    return ", ".join(parts)


def _quote(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")[:300]


#: Distinct source addresses whose named-location match is remembered per snapshot.
_LOCATION_CACHE_SIZE = 4096


def _locations(snapshot: Snapshot, source_ip: str) -> frozenset[str]:
    """The named locations of a source address, cached per snapshot: a client opens many
    flows from one address, and parsing and matching it each time showed in the p99."""
    if not source_ip:
        return frozenset()
    cache = snapshot.location_cache
    found = cache.get(source_ip)
    if found is None:
        found = snapshot.locations.match(source_ip)
        if len(cache) >= _LOCATION_CACHE_SIZE:
            cache.clear()
        cache[source_ip] = found
    return found


def admit(
    request: FlowRequest,
    *,
    snapshot: Snapshot,
    verifier: TokenVerifier,
    now: float,
    source_ip: str = "",
    strict_ip: bool = False,
) -> Decision:
    """The decision for one flow. ``strict_ip`` (strict enforcement) refuses a token whose
    ``ipaddr`` is not ``source_ip``."""
    token = request.bearer_token
    if token is None:
        return _challenge(
            "missing_token",
            "the flow carries no bearer token (Proxy-Authorization: Bearer ...)",
            'Bearer realm="limen"',
        )
    try:
        claims = verifier.verify(token, now)
    except AuthError as exc:
        return _challenge(
            exc.code,
            exc.message,
            f'Bearer realm="limen", error="invalid_token", error_description="{exc.code}"',
        )
    user = snapshot.users.get(claims.sub)
    if user is None:
        return _challenge(
            "unknown_user", "the token's user no longer exists", claims_challenge(now), claims
        )
    if not user.enabled:
        return _challenge(
            "user_disabled",
            f"user {user.username} is disabled",
            claims_challenge(user.revoked_before or now),
            claims,
        )
    if claims.auth_time < user.revoked_before or claims.iat < user.revoked_before:
        return _challenge(
            "session_revoked",
            f"access of {user.username} was revoked; a new sign-in is required",
            claims_challenge(user.revoked_before),
            claims,
        )
    if strict_ip and not same_address(claims.ipaddr, source_ip):
        # Checked before policy: a replayed token must not even learn which apps exist.
        return _challenge(
            ADDRESS_MISMATCH,
            f"{ADDRESS_MISMATCH_REASON} (signed in from {claims.ipaddr or 'unknown'}, "
            f"flow from {source_ip or 'unknown'})",
            claims_challenge(now, ADDRESS_MISMATCH_REASON),
            claims,
        )
    device = snapshot.devices.get(claims.device_id) if claims.device_id else None
    if device is not None and not device.enabled:
        return Decision("block", 403, "device_disabled", "this device is disabled", claims=claims)
    segment = snapshot.segments.match(request.host, request.port, request.protocol)
    if segment is None:
        return Decision(
            "block",
            403,
            "no_segment",
            f"no application publishes {request.host}:{request.port}/{request.protocol}",
            claims=claims,
        )
    app = snapshot.apps.get(segment.app_id)
    if app is None or not app.enabled:
        return Decision(
            "block",
            403,
            "app_disabled",
            "the application is disabled",
            claims=claims,
            segment=segment,
        )
    if claims.sub not in snapshot.assigned.get(app.id, frozenset()):
        return Decision(
            "block",
            403,
            "not_assigned",
            f"user {user.username} is not assigned to application {app.name}",
            claims=claims,
            app=app,
            segment=segment,
        )
    context = EvaluationContext(
        user_id=claims.sub,
        app_id=app.id,
        app_kind=app.kind,
        group_ids=snapshot.user_groups.get(claims.sub, frozenset()),
        source_ip=source_ip or None,
        location_ids=_locations(snapshot, source_ip),
        device_platform=device.platform if device is not None else None,
        device_compliant=device.compliant if device is not None else None,
        user_risk=user.risk_level,
        amr=frozenset(claims.amr),
        auth_time=claims.auth_time,
        now=now,
        capabilities=frozenset(claims.capabilities),
    )
    policy = snapshot.policies.evaluate(context)
    applied = policy.applied + tuple(f"{pid}:{would}" for pid, would in policy.report_only)
    if policy.action == "block":
        return Decision(
            "block",
            403,
            "policy_blocked",
            policy.reason,
            claims=claims,
            app=app,
            segment=segment,
            policy_ids=applied,
        )
    if policy.action == "challenge":
        return Decision(
            "challenge",
            401,
            "insufficient_user_authentication",
            policy.reason,
            claims=claims,
            app=app,
            segment=segment,
            policy_ids=applied,
            www_authenticate=step_up_challenge(policy),
        )
    return Decision(
        "allow", 200, "", "", claims=claims, app=app, segment=segment, policy_ids=applied
    )
