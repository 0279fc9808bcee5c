"""Conditional-access policy documents: validation, canonical form, references.

Pure library. :func:`parse_policy` turns an admin's JSON document into a frozen
:class:`PolicySpec`, or raises :class:`~limen.errors.ConfigError` (code ``invalid_policy``)
whose message starts with the exact field that is wrong (``grant.require[1]: unknown control
'mfaa'``). The evaluator lives in :mod:`limen.policy.conditional`; the format is described in
``docs/policy.md``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from limen.errors import ConfigError

STATES: Final = ("on", "off", "report_only")
PLATFORMS: Final = ("linux", "windows", "macos", "ios", "android")
RISK_LEVELS: Final = ("low", "medium", "high")
CONTROLS: Final = ("mfa", "compliant_device", "sign_in_frequency")
#: Controls that signing in again can satisfy: unmet, they are a step-up challenge.
STEP_UP_CONTROLS: Final = frozenset({"mfa", "sign_in_frequency"})
OPERATORS: Final = ("all", "one")
COMPLIANCE_STATES: Final = ("compliant", "not_compliant")
#: ``target`` values besides ``{"apps": [...]}``. ``sign_in`` targets the sign-in itself
#: (evaluated by the identity service with ``app_kind=SIGN_IN``).
TARGET_KINDS: Final = ("all_private", "quick_access", "sign_in")
SIGN_IN: Final = "sign_in"
QUICK_ACCESS: Final = "quick_access"
ALL: Final = "all"
#: A pseudo location id: matched when the source address is inside any trusted location.
ALL_TRUSTED: Final = "all_trusted"
#: ``acr`` value asked for when MFA is missing (RFC 9470 ``acr_values``).
ACR_MFA: Final = "urn:limen:acr:mfa"

#: Entries per id list in one policy: far above any sane policy (Entra allows a few hundred
#: users per policy) while bounding the work done on a hostile document.
MAX_LIST: Final = 5000
#: Sign-in frequency: 1 minute to 365 days (Entra offers 1 hour to 365 days).
MAX_AGE_MINUTES_MAX: Final = 365 * 24 * 60
MAX_DESCRIPTION: Final = 4096
#: CIDRs per named location (Entra allows 2,000 ranges per location).
MAX_CIDRS: Final = 2000

_CAPABILITY = re.compile(r"^[a-z0-9_]{1,32}$")
#: Prefixed ids (``usr_...``); :mod:`limen.ids` makes 20 hex characters, imports may differ.
_ID_BODY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_TOP_FIELDS: Final = ("description", "users", "groups", "target", "conditions", "grant")
_CONDITION_FIELDS: Final = (
    "locations",
    "device_platforms",
    "device_compliance",
    "user_risk",
    "client_capabilities",
)


# --- the policy document -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """One validated policy document (without its id, name and state).

    ``None`` for a condition means "not set": it does not narrow the policy.
    """

    users_include: frozenset[str] = frozenset()
    users_exclude: frozenset[str] = frozenset()
    groups_include: frozenset[str] = frozenset()
    groups_exclude: frozenset[str] = frozenset()
    #: ``apps`` (then :attr:`target_apps`), ``all_private``, ``quick_access`` or ``sign_in``.
    target: str = "all_private"
    target_apps: frozenset[str] = frozenset()
    locations_include: frozenset[str] | None = None
    locations_exclude: frozenset[str] = frozenset()
    platforms_include: frozenset[str] | None = None
    platforms_exclude: frozenset[str] = frozenset()
    #: ``compliant`` or ``not_compliant`` (an unknown device counts as not compliant).
    device_compliance: str | None = None
    user_risk: frozenset[str] | None = None
    capabilities_has: frozenset[str] = frozenset()
    capabilities_lacks: frozenset[str] = frozenset()
    block: bool = False
    #: In the admin's order: for ``one``, the first step-up control is the one asked for.
    require: tuple[str, ...] = ()
    operator: str = "all"
    max_age_minutes: int | None = None
    description: str = ""


def _err(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}", code="invalid_policy")


def _dict(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _err(path, f"must be an object, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise _err(path, f"key {key!r} is not a string")
    return value


def _only(value: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
    for key in value:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise _err(where, f"unknown field (expected one of {', '.join(allowed)})")


def _strings(value: object, path: str) -> list[str]:
    if not isinstance(value, list):
        raise _err(path, f"must be a list, not {type(value).__name__}")
    if len(value) > MAX_LIST:
        raise _err(path, f"more than {MAX_LIST} entries")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _err(f"{path}[{i}]", f"must be a string, not {type(item).__name__}")
        if item in out:
            raise _err(f"{path}[{i}]", f"{item!r} is listed twice")
        out.append(item)
    return out


def _ids(
    value: object, path: str, prefix: str, what: str, keywords: Sequence[str] = ()
) -> frozenset[str]:
    items = _strings(value, path)
    for i, item in enumerate(items):
        if item in keywords:
            continue
        body = item[len(prefix) + 1 :]
        if not item.startswith(prefix + "_") or not _ID_BODY.match(body):
            extra = "".join(f" or {k!r}" for k in keywords)
            raise _err(f"{path}[{i}]", f"{item!r} is not a {what} id ({prefix}_...){extra}")
    return frozenset(items)


def _choices(value: object, path: str, allowed: Sequence[str], what: str) -> frozenset[str]:
    items = _strings(value, path)
    for i, item in enumerate(items):
        if item not in allowed:
            raise _err(
                f"{path}[{i}]", f"unknown {what} {item!r} (expected one of {', '.join(allowed)})"
            )
    return frozenset(items)


def _include_exclude(value: object, path: str) -> tuple[object, object]:
    """``{"include": [...], "exclude": [...]}``; a bare list is shorthand for include."""
    if isinstance(value, list):
        return value, []
    obj = _dict(value, path)
    _only(obj, ("include", "exclude"), path)
    return obj.get("include", []), obj.get("exclude", [])


def parse_policy(doc: object) -> PolicySpec:
    """Validate a policy document and return its :class:`PolicySpec`.

    Raises :class:`ConfigError` (code ``invalid_policy``) whose message starts with the exact
    field that is wrong, e.g. ``grant.require[1]: unknown control 'mfaa'``.
    """
    top = _dict(doc, "policy")
    _only(top, _TOP_FIELDS, "")

    description = top.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise _err("description", f"must be a string of at most {MAX_DESCRIPTION} characters")

    users_in, users_out = _include_exclude(top.get("users", {}), "users")
    users_include = _ids(users_in, "users.include", "usr", "user", (ALL,))
    users_exclude = _ids(users_out, "users.exclude", "usr", "user")
    groups_in, groups_out = _include_exclude(top.get("groups", {}), "groups")
    groups_include = _ids(groups_in, "groups.include", "grp", "group")
    groups_exclude = _ids(groups_out, "groups.exclude", "grp", "group")
    if not users_include and not groups_include:
        raise _err(
            "users.include",
            "the policy includes nobody: list users or groups to include, or 'all'",
        )

    if "target" not in top:
        raise _err(
            "target",
            'missing: give {"apps": [...]} or one of ' + ", ".join(TARGET_KINDS),
        )
    raw_target = top["target"]
    target_apps: frozenset[str] = frozenset()
    if isinstance(raw_target, str):
        if raw_target not in TARGET_KINDS:
            raise _err(
                "target",
                f'unknown target {raw_target!r} (expected {{"apps": [...]}} or one of '
                f"{', '.join(TARGET_KINDS)})",
            )
        target = raw_target
    else:
        obj = _dict(raw_target, "target")
        _only(obj, ("apps",), "target")
        target = "apps"
        target_apps = _ids(obj.get("apps", []), "target.apps", "app", "application")
        if not target_apps:
            raise _err("target.apps", "empty: list at least one application")

    cond = _dict(top.get("conditions", {}), "conditions")
    _only(cond, _CONDITION_FIELDS, "conditions")
    locations_include: frozenset[str] | None = None
    locations_exclude: frozenset[str] = frozenset()
    if "locations" in cond:
        loc_in, loc_out = _include_exclude(cond["locations"], "conditions.locations")
        locations_include = _ids(
            loc_in, "conditions.locations.include", "loc", "location", (ALL, ALL_TRUSTED)
        )
        locations_exclude = _ids(
            loc_out, "conditions.locations.exclude", "loc", "location", (ALL_TRUSTED,)
        )
        if not locations_include:
            raise _err(
                "conditions.locations.include", "empty: list locations, 'all' or 'all_trusted'"
            )
    platforms_include: frozenset[str] | None = None
    platforms_exclude: frozenset[str] = frozenset()
    if "device_platforms" in cond:
        plat_in, plat_out = _include_exclude(
            cond["device_platforms"], "conditions.device_platforms"
        )
        platforms_include = _choices(
            plat_in, "conditions.device_platforms.include", (*PLATFORMS, ALL), "platform"
        )
        platforms_exclude = _choices(
            plat_out, "conditions.device_platforms.exclude", PLATFORMS, "platform"
        )
        if not platforms_include:
            raise _err("conditions.device_platforms.include", "empty: list platforms or 'all'")
    device_compliance = cond.get("device_compliance")
    if device_compliance is not None and device_compliance not in COMPLIANCE_STATES:
        raise _err(
            "conditions.device_compliance",
            f"must be one of {', '.join(COMPLIANCE_STATES)}, not {device_compliance!r}",
        )
    user_risk: frozenset[str] | None = None
    if "user_risk" in cond:
        user_risk = _choices(cond["user_risk"], "conditions.user_risk", RISK_LEVELS, "risk level")
        if not user_risk:
            raise _err("conditions.user_risk", "empty: list risk levels")
    caps_has: frozenset[str] = frozenset()
    caps_lacks: frozenset[str] = frozenset()
    if "client_capabilities" in cond:
        path = "conditions.client_capabilities"
        caps = _dict(cond["client_capabilities"], path)
        _only(caps, ("has", "lacks"), path)
        caps_has = frozenset(_strings(caps.get("has", []), f"{path}.has"))
        caps_lacks = frozenset(_strings(caps.get("lacks", []), f"{path}.lacks"))
        for sub, values in (("has", caps.get("has", [])), ("lacks", caps.get("lacks", []))):
            for i, cap in enumerate(values):
                if not _CAPABILITY.match(cap):
                    raise _err(f"{path}.{sub}[{i}]", f"{cap!r} is not a capability name")
        if not caps_has and not caps_lacks:
            raise _err(path, "empty: give 'has' or 'lacks' capabilities")
        if caps_has & caps_lacks:
            raise _err(path, "a capability cannot be both in 'has' and 'lacks'")

    if "grant" not in top:
        raise _err("grant", 'missing: give {"block": true} or {"require": [...]}')
    grant = _dict(top["grant"], "grant")
    _only(grant, ("block", "require", "operator", "max_age_minutes"), "grant")
    block = grant.get("block", False)
    if not isinstance(block, bool):
        raise _err("grant.block", "must be true or false")
    require: tuple[str, ...] = ()
    operator = grant.get("operator", "all")
    max_age: int | None = None
    if block:
        for extra in ("require", "operator", "max_age_minutes"):
            if extra in grant:
                raise _err(f"grant.{extra}", "not allowed with block (a block has no controls)")
    else:
        if "require" not in grant:
            raise _err("grant.require", "missing: list controls, or set block to true")
        # A tuple, not a set: the admin's order picks the step-up asked for with "one".
        require = tuple(_strings(grant["require"], "grant.require"))
        for i, control in enumerate(require):
            if control not in CONTROLS:
                raise _err(
                    f"grant.require[{i}]",
                    f"unknown control {control!r} (expected one of {', '.join(CONTROLS)})",
                )
        if not require:
            raise _err("grant.require", "empty: list at least one control")
        if operator not in OPERATORS:
            raise _err("grant.operator", f"must be 'all' or 'one', not {operator!r}")
        raw_age = grant.get("max_age_minutes")
        if "sign_in_frequency" in require:
            if (
                not isinstance(raw_age, int)
                or isinstance(raw_age, bool)
                or not 1 <= raw_age <= MAX_AGE_MINUTES_MAX
            ):
                raise _err(
                    "grant.max_age_minutes",
                    f"sign_in_frequency needs a whole number of minutes, 1-{MAX_AGE_MINUTES_MAX}",
                )
            max_age = raw_age
        elif raw_age is not None:
            raise _err("grant.max_age_minutes", "only meaningful with sign_in_frequency")

    return PolicySpec(
        users_include=users_include,
        users_exclude=users_exclude,
        groups_include=groups_include,
        groups_exclude=groups_exclude,
        target=target,
        target_apps=target_apps,
        locations_include=locations_include,
        locations_exclude=locations_exclude,
        platforms_include=platforms_include,
        platforms_exclude=platforms_exclude,
        device_compliance=device_compliance,
        user_risk=user_risk,
        capabilities_has=caps_has,
        capabilities_lacks=caps_lacks,
        block=block,
        require=require,
        operator=operator if not block else "all",
        max_age_minutes=max_age,
        description=description,
    )


def spec_to_dict(spec: PolicySpec) -> dict[str, Any]:
    """The canonical document of ``spec`` (sorted lists): what the store keeps.

    ``parse_policy(spec_to_dict(spec)) == spec`` always holds.
    """
    doc: dict[str, Any] = {}
    if spec.description:
        doc["description"] = spec.description
    doc["users"] = {"include": sorted(spec.users_include), "exclude": sorted(spec.users_exclude)}
    doc["groups"] = {
        "include": sorted(spec.groups_include),
        "exclude": sorted(spec.groups_exclude),
    }
    doc["target"] = {"apps": sorted(spec.target_apps)} if spec.target == "apps" else spec.target
    cond: dict[str, Any] = {}
    if spec.locations_include is not None:
        cond["locations"] = {
            "include": sorted(spec.locations_include),
            "exclude": sorted(spec.locations_exclude),
        }
    if spec.platforms_include is not None:
        cond["device_platforms"] = {
            "include": sorted(spec.platforms_include),
            "exclude": sorted(spec.platforms_exclude),
        }
    if spec.device_compliance is not None:
        cond["device_compliance"] = spec.device_compliance
    if spec.user_risk is not None:
        cond["user_risk"] = sorted(spec.user_risk)
    if spec.capabilities_has or spec.capabilities_lacks:
        cond["client_capabilities"] = {
            "has": sorted(spec.capabilities_has),
            "lacks": sorted(spec.capabilities_lacks),
        }
    doc["conditions"] = cond
    if spec.block:
        doc["grant"] = {"block": True}
    else:
        grant: dict[str, Any] = {"require": list(spec.require), "operator": spec.operator}
        if spec.max_age_minutes is not None:
            grant["max_age_minutes"] = spec.max_age_minutes
        doc["grant"] = grant
    return doc


def spec_references(spec: PolicySpec) -> list[tuple[str, str, str]]:
    """Every object ``spec`` names, as ``(field, kind, id)`` with kind ``user``, ``group``,
    ``application`` or ``location``, so the caller can flag references to deleted objects."""
    refs: list[tuple[str, str, str]] = []
    for path, kind, ids in (
        ("users.include", "user", spec.users_include),
        ("users.exclude", "user", spec.users_exclude),
        ("groups.include", "group", spec.groups_include),
        ("groups.exclude", "group", spec.groups_exclude),
        ("target.apps", "application", spec.target_apps),
        ("conditions.locations.include", "location", spec.locations_include or frozenset()),
        ("conditions.locations.exclude", "location", spec.locations_exclude),
    ):
        refs.extend((path, kind, x) for x in sorted(ids) if x not in (ALL, ALL_TRUSTED))
    return refs


def normalize_platform(os_name: str | None) -> str | None:
    """A device's reported OS (``Linux``, ``Windows 11``, ``darwin``, ``iPadOS``) as a policy
    platform, or None when unknown."""
    if not os_name:
        return None
    text = os_name.strip().lower()
    for platform, prefixes in (
        ("windows", ("windows", "win32", "win")),
        ("macos", ("macos", "mac os", "darwin", "osx", "os x")),
        ("ios", ("ios", "ipados", "iphone", "ipad")),
        ("android", ("android",)),
        ("linux", ("linux", "ubuntu", "debian", "fedora", "rhel", "arch", "alpine")),
    ):
        if text.startswith(prefixes):
            return platform
    return None


# --- named locations ----------------------------------------------------------------------


def parse_cidrs(value: object, path: str = "cidrs") -> tuple[str, ...]:
    """Validate a named location's ranges; returns them normalised (``10.0.0.0/8``).

    A bare address is a /32 (or /128); host bits set is an error, as for segments.
    """
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list of CIDRs", code="invalid_location")
    if not value:
        raise ConfigError(f"{path}: empty: give at least one range", code="invalid_location")
    if len(value) > MAX_CIDRS:
        raise ConfigError(f"{path}: more than {MAX_CIDRS} ranges", code="invalid_location")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]: must be a string", code="invalid_location")
        try:
            net = ipaddress.ip_network(item.strip(), strict=True)
        except ValueError as exc:
            raise ConfigError(
                f"{path}[{i}]: {item!r} is not a CIDR ({exc})", code="invalid_location"
            ) from None
        text = str(net)
        if text not in out:
            out.append(text)
    return tuple(out)
