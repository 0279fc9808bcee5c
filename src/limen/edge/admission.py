"""Flow admission: the decision for one new flow. Pure — no I/O, no clock (``now`` is
passed in) — so every allow and refusal path is a table-driven test.

Order of checks (each refusal says which one failed): bearer token present → token valid
(signature, issuer, audience, lifetime) → user known and enabled → token not older than the
user's revocation time (continuous access evaluation) → a segment publishes the destination
→ its application is enabled → the user is assigned to it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from limen.edge.snapshot import AppInfo, Snapshot
from limen.errors import AuthError
from limen.identity.tokens import AccessClaims, TokenVerifier
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

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


def claims_challenge(revoked_at: float) -> str:
    """Entra's CAE claims challenge: the client must bring a token issued after
    ``revoked_at`` (``nbf``)."""
    claims = {"access_token": {"nbf": {"essential": True, "value": str(int(revoked_at))}}}
    encoded = base64.b64encode(json.dumps(claims, separators=(",", ":")).encode()).decode()
    return (
        'Bearer realm="limen", error="insufficient_claims", '
        f'error_description="access was revoked; sign in again", claims="{encoded}"'
    )


def _challenge(code: str, reason: str, header: str, claims: AccessClaims | None = None) -> Decision:
    return Decision("challenge", 401, code, reason, claims=claims, www_authenticate=header)


def admit(
    request: FlowRequest, *, snapshot: Snapshot, verifier: TokenVerifier, now: float
) -> Decision:
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
    return Decision("allow", 200, "", "", claims=claims, app=app, segment=segment)
