"""Conditional access at sign-in: the identity service's :data:`SignInCheck` built from the
stored policies (design §4: token issuance is the first enforcement point).

:class:`SignInPolicy` is called by the token endpoint for every password, device-code and
refresh grant, after the credentials were checked and before any token is issued (or a
refresh token spent). It evaluates the policies whose target is ``sign_in`` with
``app_kind=SIGN_IN`` and ``app_id=""``:

* **block** (a ``block`` grant, or an unmet ``compliant_device``) →
  :class:`~limen.errors.PolicyDenied` with code ``sign_in_blocked`` and a message naming the
  policy; the token endpoint returns it unchanged (``400 {"error": "sign_in_blocked"}``) and
  ``limen client login`` prints ``error: sign_in_blocked: …``.
* **challenge** for ``mfa`` → ``invalid_grant`` "a second factor is required: …", the words
  the token endpoint uses for its own step-up refusal, unless the attempt already carries
  ``mfa`` in its ``amr``; for ``sign_in_frequency`` → ``invalid_grant`` "re-authentication
  required: …". A password or device-code sign-in is fresh by definition; a refresh grant is
  treated as *not* fresh, because :class:`SignInAttempt` does not carry the session's
  ``auth_time`` (fail closed: the user signs in again).
* ``report_only`` policies are evaluated and logged, never enforced.

What the context is made of: the attempt's user (id, risk level), the user's groups (nested
groups resolved), the source address of the token request matched against the named
locations, and the device the request names *if it is already registered* to this user
(platform from its OS, compliance). A first sign-in registers its device only after this
check, so it is judged as "no device" (unknown platform, not compliant). Client capabilities
are not part of :class:`SignInAttempt` either: a sign-in is judged as declaring none.

Policies and named locations are compiled once per configuration version (one cheap query
per sign-in reads the version); groups and the device are read only when a compiled policy
looks at them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from limen.admin.api_policies import load_location_index, load_policy_entries, user_group_ids
from limen.errors import AuthError, LimenError, PolicyDenied
from limen.identity.service import SECOND_FACTOR_REQUIRED, SignInAttempt
from limen.policy.conditional import (
    RISK_LEVELS,
    SIGN_IN,
    EvaluationContext,
    LocationIndex,
    PolicyDecision,
    PolicyEntry,
    PolicySet,
    PolicySpec,
    normalize_platform,
)
from limen.store.db import Store
from limen.store.models import Device

log = logging.getLogger(__name__)

#: The code of a sign-in refused by a blocking policy (token endpoint ``error``).
SIGN_IN_BLOCKED = "sign_in_blocked"
#: Grant types whose sign-in happened just now (the user typed a password or approved a
#: device code): ``auth_time`` is the time of the request.
_INTERACTIVE_GRANTS = frozenset({"password", "urn:ietf:params:oauth:grant-type:device_code"})
RE_AUTHENTICATION_REQUIRED = "re-authentication required"

#: ``ServiceContext.audit``: (actor, action, target, details).
AuditHook = Callable[[str, str, str, dict[str, Any] | None], None]


@dataclass(frozen=True, slots=True)
class CompiledSignIn:
    """The sign-in policies of one configuration version, ready to evaluate."""

    version: int
    policies: PolicySet
    locations: LocationIndex
    #: Whether any compiled policy looks at groups (else no membership query per sign-in).
    needs_groups: bool
    #: Whether any compiled policy looks at the device (platform, compliance).
    needs_device: bool


def _uses_groups(spec: PolicySpec) -> bool:
    return bool(spec.groups_include or spec.groups_exclude)


def _uses_device(spec: PolicySpec) -> bool:
    return (
        spec.platforms_include is not None
        or spec.device_compliance is not None
        or "compliant_device" in spec.require
    )


def compile_sign_in(
    entries: Sequence[PolicyEntry], locations: LocationIndex, version: int = 0
) -> CompiledSignIn:
    """Compile the ``sign_in`` policies among ``entries`` (the others never judge a
    sign-in, so they are left out of the set)."""
    chosen = [e for e in entries if e[3].target == SIGN_IN and e[2] != "off"]
    return CompiledSignIn(
        version=version,
        policies=PolicySet.compile(chosen),
        locations=locations,
        needs_groups=any(_uses_groups(e[3]) for e in chosen),
        needs_device=any(_uses_device(e[3]) for e in chosen),
    )


def refusal(decision: PolicyDecision, attempt: SignInAttempt) -> LimenError | None:
    """The error a sign-in gets for ``decision`` (None: the sign-in may proceed)."""
    where = attempt.ip_address or "an unknown address"
    if decision.action == "block":
        return PolicyDenied(
            f"sign-in from {where} refused: {decision.reason}", code=SIGN_IN_BLOCKED
        )
    if decision.action != "challenge":
        return None
    if "mfa" in decision.unmet and "mfa" not in attempt.amr:
        # The step-up words of the token endpoint: a client that knows them asks the user
        # for a one-time code (RFC 9470 §4).
        return AuthError(f"{SECOND_FACTOR_REQUIRED}: {decision.reason}", code="invalid_grant")
    return AuthError(f"{RE_AUTHENTICATION_REQUIRED}: {decision.reason}", code="invalid_grant")


class SignInPolicy:
    """The sign-in check of the token endpoint (a :data:`limen.identity.service.SignInCheck`):
    ``build_router(ctx, sign_in_check=SignInPolicy(ctx.store, audit=ctx.audit))``.

    Thread-safe: the token endpoint calls it from its thread pool.
    """

    def __init__(
        self,
        store: Store,
        *,
        audit: AuditHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._audit = audit
        self._clock = clock
        self._compiled: CompiledSignIn | None = None
        self._lock = threading.Lock()

    # --- compilation ---------------------------------------------------------------------

    def compiled(self) -> CompiledSignIn:
        """The sign-in policies of the current configuration version (recompiled when the
        version moved; one small query otherwise)."""
        version = self.store.config_version()
        current = self._compiled
        if current is not None and current.version == version:
            return current
        with self._lock:
            current = self._compiled
            if current is not None and current.version == version:
                return current
            try:
                with self.store.session() as s:
                    entries = load_policy_entries(s)
                    locations = load_location_index(s)
                fresh = compile_sign_in(entries, locations, version)
            except LimenError as exc:
                # A stored policy no longer parses (or the store failed): fail closed, as
                # the edge does, rather than drop a policy that may be a block. Not cached,
                # so the next sign-in tries again.
                log.error("sign-in policies cannot be compiled: %s (%s)", exc, exc.code)
                raise PolicyDenied(
                    "sign-in refused: the conditional-access policies cannot be evaluated "
                    f"({exc.code}); an administrator must fix them",
                    code=SIGN_IN_BLOCKED,
                ) from exc
            self._compiled = fresh
            log.info(
                "compiled %d sign-in polic%s for configuration version %d",
                fresh.policies.size,
                "y" if fresh.policies.size == 1 else "ies",
                version,
            )
            return fresh

    # --- evaluation ----------------------------------------------------------------------

    def context(
        self, attempt: SignInAttempt, compiled: CompiledSignIn, now: float
    ) -> EvaluationContext:
        """What the sign-in is judged on (see the module docstring)."""
        user = attempt.user
        groups: frozenset[str] = frozenset()
        platform: str | None = None
        compliant: bool | None = None
        if compiled.needs_groups or (compiled.needs_device and attempt.device_id):
            with self.store.session() as s:
                if compiled.needs_groups:
                    groups = user_group_ids(s, user.id)
                if compiled.needs_device and attempt.device_id:
                    device = s.get(Device, attempt.device_id)
                    # Another user's device says nothing about this user's (the identity
                    # service refuses that sign-in anyway).
                    if device is not None and device.user_id in (None, user.id):
                        platform = normalize_platform(device.os)
                        compliant = bool(device.compliant)
        ip = attempt.ip_address or None
        risk = user.risk_level if user.risk_level in RISK_LEVELS else "low"
        return EvaluationContext(
            user_id=user.id,
            app_id="",
            app_kind=SIGN_IN,
            group_ids=groups,
            source_ip=ip,
            location_ids=compiled.locations.match(ip),
            device_platform=platform,
            device_compliant=compliant,
            user_risk=risk,
            amr=frozenset(attempt.amr),
            auth_time=now if attempt.grant_type in _INTERACTIVE_GRANTS else None,
            now=now,
            capabilities=frozenset(),
        )

    def decide(self, attempt: SignInAttempt, now: float | None = None) -> PolicyDecision:
        """The combined decision of the sign-in policies for ``attempt``."""
        compiled = self.compiled()
        if compiled.policies.size == 0:
            return PolicyDecision("allow", reason="no sign-in policy")
        when = self._clock() if now is None else now
        return compiled.policies.evaluate(self.context(attempt, compiled, when))

    def __call__(self, attempt: SignInAttempt) -> None:
        """Allow by returning; refuse by raising (see :func:`refusal`)."""
        decision = self.decide(attempt)
        if decision.report_only:
            log.info(
                "sign-in of user %s from %s: report-only %s",
                attempt.user.id,
                attempt.ip_address or "?",
                ", ".join(f"{pid}:{would}" for pid, would in decision.report_only),
            )
        error = refusal(decision, attempt)
        if error is None:
            return
        log.info(
            "sign-in of user %s from %s (grant %s) refused by policy %s: %s",
            attempt.user.id,
            attempt.ip_address or "?",
            attempt.grant_type,
            decision.policy_id,
            error.code,
        )
        self._record(attempt, decision, error)
        raise error

    def _record(self, attempt: SignInAttempt, decision: PolicyDecision, error: LimenError) -> None:
        # A refresh grant runs this check inside the identity service's own unit of work; an
        # audit write from here could then wait on that unit's write lock (SQLite) in the
        # same thread. Refreshes are logged above, not audited.
        if self._audit is None or attempt.grant_type not in _INTERACTIVE_GRANTS:
            return
        try:
            _write_audit(self._audit, attempt, decision, error)
        except LimenError as exc:
            # The refusal stands either way; a failed audit write must not replace it.
            log.error("cannot audit a refused sign-in: %s (%s)", exc, exc.code)


def _write_audit(
    audit: AuditHook, attempt: SignInAttempt, decision: PolicyDecision, error: LimenError
) -> None:
    audit(
        f"user:{attempt.user.username}",
        "sign_in.refused",
        attempt.user.id,
        {
            "code": error.code,
            "action": decision.action,
            "policy_id": decision.policy_id,
            "policy_ids": list(decision.applied),
            "reason": decision.reason,
            "unmet": list(decision.unmet),
            "ip": attempt.ip_address,
            "device_id": attempt.device_id,
            "grant_type": attempt.grant_type,
        },
    )
