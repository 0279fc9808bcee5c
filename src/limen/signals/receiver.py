"""The Shared Signals receiver (OpenID SSF 1.0): stream management with a transmitter,
SET processing, push delivery (RFC 8935) and poll delivery (RFC 8936).

Rules this module keeps:

- Every SET, pushed or polled, goes through :meth:`SetProcessor.process`: validation
  (:mod:`~limen.signals.set_validation`, keys from the transmitter's ``jwks_uri``, cached,
  refetched once on an unknown ``kid`` and at most every :attr:`JwksCache.min_refetch`
  seconds, so random ``kid`` values cannot make us hammer the transmitter), the event's
  mapping (:mod:`~limen.signals.events`), the replay cache on ``(iss, jti)``, then the
  action (:mod:`~limen.signals.actions`).
- Push: ``POST /ssf/push/{transmitter_id}`` with the bearer token Limen issued for that
  transmitter and ``Content-Type: application/secevent+jwt``; ``202`` empty, or ``400
  {"err", "description"}`` with the RFC 8935 §2.4 code.
- Poll: one task per poll-mode transmitter POSTs ``{maxEvents, returnImmediately: false,
  ack, setErrs}`` and long-polls; a SET is acknowledged on the next request after it was
  processed (a replayed one too: its earlier ack was lost); errors back off, bounded.
- Transmitter URLs must be ``https``, except on loopback (tests, a co-located IdP).
- The transmitter's management token is sent, never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from limen.bus.inprocess import BusEvent
from limen.errors import ConfigError, StoreError, UpstreamError
from limen.net.tasks import spawn
from limen.service import ServiceContext
from limen.signals import TRANSMITTERS_CHANGED
from limen.signals.actions import apply_signal
from limen.signals.events import Action, EventError, Plan, parse_subject, plan_event, short_name
from limen.signals.set_validation import (
    DEFAULT_MAX_AGE,
    Expectations,
    PublicKey,
    ReplayedSet,
    SetError,
    UnknownKey,
    ValidatedSet,
    public_keys_from_jwks,
    validate_set,
)
from limen.store.db import token_hash
from limen.store.signal_models import ReplayCache, SignalRecord, SsfTransmitter

log = logging.getLogger(__name__)

PUSH = "urn:ietf:rfc:8935"
POLL = "urn:ietf:rfc:8936"
DELIVERY_URNS = {"push": PUSH, "poll": POLL}
SET_MEDIA_TYPE = "application/secevent+jwt"
#: Documents fetched from a transmitter (metadata, JWKS, stream) larger than this are refused.
MAX_DOCUMENT_BYTES = 1024 * 1024
HTTP_TIMEOUT = 10.0
#: How long a poll request may wait for events (RFC 8936 §2.4 long polling), and the margin
#: added to the HTTP timeout so the transmitter answers first.
LONG_POLL_SECONDS = 30.0
MAX_EVENTS = 100
BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
#: How often the replay cache is pruned of entries that can no longer be replayed.
PRUNE_EVERY = 60.0

HttpFactory = Callable[[], httpx.Client]


def _default_http() -> httpx.Client:
    return httpx.Client(timeout=HTTP_TIMEOUT, follow_redirects=False)


def check_url(url: str, what: str) -> str:
    """``url`` if it is https, or http on loopback; else :class:`ConfigError`."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host:
        loopback = host == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(host).is_loopback
        if loopback:
            return url
    raise ConfigError(f"{what}: {url!r} must be an https URL", code="invalid_url")


def well_known_url(issuer: str) -> str:
    """SSF §7.2: ``/.well-known/ssf-configuration`` inserted before the issuer's path."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, "/.well-known/ssf-configuration" + path, "", ""))


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    if len(response.content) > MAX_DOCUMENT_BYTES:
        raise UpstreamError(f"{what}: response too large", code="ssf_transmitter_error")
    try:
        doc = response.json()
    except ValueError:
        raise UpstreamError(f"{what}: not JSON", code="ssf_transmitter_error") from None
    if not isinstance(doc, dict):
        raise UpstreamError(f"{what}: not a JSON object", code="ssf_transmitter_error")
    return doc


# --- keys -------------------------------------------------------------------------------------


class JwksCache:
    """Transmitters' signing keys by ``jwks_uri``, fetched on first use and refetched on an
    unknown ``kid`` (at most once per ``min_refetch`` seconds per URI)."""

    def __init__(self, http: HttpFactory = _default_http, *, min_refetch: float = 5.0) -> None:
        self.http = http
        self.min_refetch = min_refetch
        self._keys: dict[str, dict[str, tuple[PublicKey, str]]] = {}
        #: When an unknown kid last made us refetch, per URI (the first fetch is free).
        self._refetched: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, uri: str, *, refresh: bool = False) -> dict[str, tuple[PublicKey, str]]:
        """The keys of ``uri``; with ``refresh``, fetched again unless an earlier refresh
        happened less than ``min_refetch`` seconds ago."""
        now = time.monotonic()
        with self._lock:
            cached = self._keys.get(uri)
            if cached is not None and refresh:
                last = self._refetched.get(uri)
                if last is not None and now - last < self.min_refetch:
                    return cached
                self._refetched[uri] = now
        if cached is not None and not refresh:
            return cached
        try:
            with self.http() as client:
                response = client.get(check_url(uri, "jwks_uri"))
        except httpx.HTTPError as exc:
            if cached is not None:
                return cached
            raise SetError(
                f"cannot fetch the transmitter's JWKS: {exc}", code="invalid_key"
            ) from None
        if response.status_code != 200:
            if cached is not None:
                return cached
            raise SetError(f"JWKS fetch answered {response.status_code}", code="invalid_key")
        try:
            keys = public_keys_from_jwks(_json(response, "JWKS"))
        except UpstreamError as exc:
            raise SetError(exc.message, code="invalid_key") from None
        with self._lock:
            self._keys[uri] = keys
        log.info("fetched %d signing key(s) from %s", len(keys), uri)
        return keys


# --- processing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Processed:
    """A SET accepted (and acknowledged)."""

    jti: str
    event_type: str
    action: str
    signal_id: str
    user_id: str | None = None


class SetProcessor:
    """Validates and applies SETs for every transmitter; thread-safe, blocking (call it
    from a worker thread)."""

    def __init__(
        self,
        ctx: ServiceContext,
        jwks: JwksCache | None = None,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx
        self.jwks = jwks or JwksCache()
        self.max_age = max_age
        self.clock = clock
        self._pruned_at = 0.0

    def transmitter(self, transmitter_id: str) -> SsfTransmitter | None:
        with self.ctx.store.session() as s:
            return s.get(SsfTransmitter, transmitter_id)

    def authenticate_push(self, transmitter_id: str, authorization: str | None) -> SsfTransmitter:
        """The transmitter whose push token is in ``authorization`` (RFC 8935 §2.3)."""
        row = self.transmitter(transmitter_id)
        scheme, _, token = (authorization or "").partition(" ")
        presented = token_hash(token.strip()) if scheme.lower() == "bearer" else ""
        if (
            row is None
            or not row.push_token_hash
            or not hmac.compare_digest(presented, row.push_token_hash)
        ):
            raise SetError("the push is not authenticated", code="authentication_failed")
        if row.delivery_method != "push":
            raise SetError("this stream does not use push delivery", code="access_denied")
        return row

    def process(self, row: SsfTransmitter, token: str | bytes) -> Processed:
        """Validate, de-duplicate and apply one SET from ``row``'s transmitter. Raises
        :class:`SetError` (RFC 8935 code) when it is refused."""
        if row.status == "disabled":
            raise SetError("this transmitter is disabled in Limen", code="access_denied")
        received = self.clock()
        expect = Expectations(row.issuer, row.audience, max_age=self.max_age)
        if not row.jwks_uri:
            raise SetError("no jwks_uri known for this transmitter", code="invalid_key")
        keys = self.jwks.get(row.jwks_uri)
        try:
            valid = validate_set(token, keys, expect, received)
        except UnknownKey:
            # Key rotation: fetch once more, then the kid must be there.
            keys = self.jwks.get(row.jwks_uri, refresh=True)
            valid = validate_set(token, keys, expect, received)
        try:
            plan = plan_event(
                valid.event_type, valid.event, iat=valid.iat, toe=valid.toe, received_at=received
            )
            ref = parse_subject(valid.sub_id) if valid.sub_id is not None else None
        except EventError as exc:
            raise SetError(f"{short_name(valid.event_type)}: {exc}") from None
        self._remember(valid, received)
        source = f"ssf:{row.issuer}"
        subject = ref.display() if ref is not None else "-"
        detail = (
            {"transmitter_id": row.id, "txn": valid.txn}
            if valid.txn
            else {"transmitter_id": row.id}
        )
        if plan.action in (Action.VERIFICATION, Action.STREAM_UPDATED):
            return self._stream_event(row, valid, plan, source, subject, detail, received)
        outcome = apply_signal(
            self.ctx,
            source=source,
            subject=subject,
            event_type=valid.event_type,
            plan=plan,
            ref=ref,
            issuer=row.issuer,
            jti=valid.jti,
            received_at=received,
            detail=detail,
        )
        self._touch(row.id, received)
        return Processed(
            valid.jti, valid.event_type, outcome.action, outcome.signal_id, outcome.user_id
        )

    def _remember(self, valid: ValidatedSet, now: float) -> None:
        """Add ``(iss, jti)`` to the replay cache, or raise :class:`ReplayedSet`."""
        try:
            with self.ctx.store.session() as s:
                if now - self._pruned_at > PRUNE_EVERY:
                    self._pruned_at = now
                    s.execute(delete(ReplayCache).where(ReplayCache.expires_at < now))
                if s.get(ReplayCache, (valid.iss, valid.jti)) is not None:
                    raise ReplayedSet(f"jti {valid.jti!r} was already received")
                s.add(
                    ReplayCache(
                        iss=valid.iss, jti=valid.jti, expires_at=valid.iat + self.max_age + 300
                    )
                )
        except StoreError as exc:
            # Two deliveries of one SET racing: the loser's insert hits the primary key.
            if isinstance(exc.__cause__, IntegrityError):
                raise ReplayedSet(f"jti {valid.jti!r} was already received") from None
            raise

    def _touch(self, transmitter_id: str, now: float) -> None:
        with self.ctx.store.session() as s:
            row = s.get(SsfTransmitter, transmitter_id)
            if row is not None:
                row.last_event_at = now

    def _stream_event(
        self,
        row: SsfTransmitter,
        valid: ValidatedSet,
        plan: Plan,
        source: str,
        subject: str,
        detail: dict[str, Any],
        now: float,
    ) -> Processed:
        action = plan.action.value
        info = {**plan.detail, **detail}
        with self.ctx.store.session() as s:
            current = s.get(SsfTransmitter, row.id)
            if current is not None:
                current.last_event_at = now
                if plan.action is Action.VERIFICATION:
                    state = valid.event.get("state")
                    if current.verification_state and state == current.verification_state:
                        current.verified_at = now
                        action = "verification: state matches"
                    else:
                        action = "verification: unexpected state"
                else:
                    status = valid.event.get("status")
                    if status in ("enabled", "paused", "disabled"):
                        current.status = str(status)
                        reason = valid.event.get("reason")
                        current.status_reason = str(reason) if isinstance(reason, str) else ""
                    current.updated_at = now
            record = SignalRecord(
                id=f"sig_{secrets.token_hex(10)}",
                source=source,
                subject=subject,
                user_id="",
                device_id="",
                event_type=valid.event_type,
                jti=valid.jti,
                received_at=now,
                event_timestamp=plan.event_timestamp,
                action=action,
                flows_cut=None,
                time_to_cut_ms=None,
                detail=info,
            )
            s.add(record)
        log.info("stream event %s from %s: %s", short_name(valid.event_type), row.issuer, action)
        return Processed(valid.jti, valid.event_type, action, record.id)


# --- push -------------------------------------------------------------------------------------


def _set_error(exc: SetError) -> JSONResponse:
    return JSONResponse({"err": exc.code, "description": exc.message}, status_code=400)


def build_push_router(ctx: ServiceContext, processor: SetProcessor | None = None) -> APIRouter:
    """``POST /ssf/push/{transmitter_id}``: the RFC 8935 push endpoint."""
    router = APIRouter(tags=["shared signals"])
    proc = processor or SetProcessor(ctx)

    @router.post("/ssf/push/{transmitter_id}", status_code=202, response_class=Response)
    async def push(transmitter_id: str, request: Request) -> Response:
        """Receive one SET (RFC 8935): 202 when accepted, else 400 with ``err``."""
        try:
            row = await asyncio.to_thread(
                proc.authenticate_push, transmitter_id, request.headers.get("authorization")
            )
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != SET_MEDIA_TYPE:
                raise SetError(f"Content-Type must be {SET_MEDIA_TYPE}")
            body = await request.body()
            await asyncio.to_thread(proc.process, row, body)
        except SetError as exc:
            log.info("push from %s refused: %s: %s", transmitter_id, exc.code, exc.message)
            return _set_error(exc)
        return Response(status_code=202)

    return router


# --- stream management (SSF §8) -----------------------------------------------------------------


class StreamClient:
    """Calls to a transmitter's SSF endpoints with its management token (blocking)."""

    def __init__(self, auth_token: str = "", http: HttpFactory = _default_http) -> None:
        self.auth_token = auth_token
        self.http = http

    def _request(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        headers = {"Accept": "application/json"}
        if self.auth_token:
            headers["Authorization"] = f"Bearer {self.auth_token}"
        try:
            with self.http() as client:
                return client.request(method, check_url(url, what), headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"{what}: {exc.__class__.__name__}: {exc}", code="ssf_transmitter_error"
            ) from None

    @staticmethod
    def _expect(response: httpx.Response, what: str, *ok: int) -> None:
        if response.status_code not in ok:
            text = response.text[:200].replace("\n", " ")
            raise UpstreamError(
                f"{what}: HTTP {response.status_code} {text}", code="ssf_transmitter_error"
            )

    def discover(self, issuer: str) -> dict[str, Any]:
        """The transmitter's metadata (SSF §7); its ``issuer`` must be ``issuer``."""
        response = self._request("GET", well_known_url(issuer), "discovery")
        self._expect(response, "discovery", 200)
        meta = _json(response, "discovery")
        if meta.get("issuer", "").rstrip("/") != issuer.rstrip("/"):
            raise UpstreamError(
                "discovery: the metadata names another issuer", code="ssf_transmitter_error"
            )
        if not isinstance(meta.get("jwks_uri"), str):
            raise UpstreamError("discovery: no jwks_uri", code="ssf_transmitter_error")
        return meta

    def create_stream(self, endpoint: str, config: dict[str, Any]) -> dict[str, Any]:
        """POST a stream configuration (SSF §8.1.1.1); on 409 (one exists) read it."""
        response = self._request("POST", endpoint, "create stream", json=config)
        if response.status_code == 409:
            existing = self.get_stream(endpoint, None)
            return existing
        self._expect(response, "create stream", 200, 201)
        return _json(response, "create stream")

    def get_stream(self, endpoint: str, stream_id: str | None) -> dict[str, Any]:
        params = {"stream_id": stream_id} if stream_id else None
        response = self._request("GET", endpoint, "read stream", params=params)
        self._expect(response, "read stream", 200)
        try:
            doc = response.json()
        except ValueError:
            raise UpstreamError("read stream: not JSON", code="ssf_transmitter_error") from None
        if isinstance(doc, list):  # SSF 1.0: without stream_id, every stream of the receiver
            if not doc or not isinstance(doc[0], dict):
                raise UpstreamError("read stream: no stream", code="ssf_transmitter_error")
            return doc[0]
        if not isinstance(doc, dict):
            raise UpstreamError("read stream: not an object", code="ssf_transmitter_error")
        return doc

    def update_stream(
        self, endpoint: str, stream_id: str, changes: dict[str, Any]
    ) -> dict[str, Any]:
        response = self._request(
            "PATCH", endpoint, "update stream", json={"stream_id": stream_id, **changes}
        )
        self._expect(response, "update stream", 200)
        return _json(response, "update stream")

    def delete_stream(self, endpoint: str, stream_id: str) -> None:
        response = self._request(
            "DELETE", endpoint, "delete stream", params={"stream_id": stream_id}
        )
        self._expect(response, "delete stream", 200, 204, 404)

    def get_status(self, endpoint: str, stream_id: str) -> dict[str, Any]:
        response = self._request("GET", endpoint, "stream status", params={"stream_id": stream_id})
        self._expect(response, "stream status", 200)
        return _json(response, "stream status")

    def set_status(
        self, endpoint: str, stream_id: str, status: str, reason: str = ""
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"stream_id": stream_id, "status": status}
        if reason:
            body["reason"] = reason
        response = self._request("POST", endpoint, "update status", json=body)
        self._expect(response, "update status", 200)
        return _json(response, "update status")

    def add_subject(self, endpoint: str, stream_id: str, subject: dict[str, Any]) -> None:
        body = {"stream_id": stream_id, "subject": subject, "verified": True}
        response = self._request("POST", endpoint, "add subject", json=body)
        self._expect(response, "add subject", 200, 204)

    def verify(self, endpoint: str, stream_id: str, state: str) -> None:
        """Ask for a verification event carrying ``state`` (SSF §8.1.4.2)."""
        response = self._request(
            "POST", endpoint, "verification", json={"stream_id": stream_id, "state": state}
        )
        self._expect(response, "verification", 200, 202, 204)


# --- poll ---------------------------------------------------------------------------------------


class Poller:
    """Long-polls one transmitter (RFC 8936 §2.4) until stopped."""

    def __init__(
        self,
        processor: SetProcessor,
        transmitter_id: str,
        *,
        long_poll: float = LONG_POLL_SECONDS,
        max_events: int = MAX_EVENTS,
    ) -> None:
        self.processor = processor
        self.transmitter_id = transmitter_id
        self.long_poll = long_poll
        self.max_events = max_events
        self.acks: list[str] = []
        self.errors: dict[str, dict[str, str]] = {}
        self._stop = asyncio.Event()
        #: Requests answered (for tests and status).
        self.polls = 0

    def stop(self) -> None:
        self._stop.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    async def run(self) -> None:
        backoff = BACKOFF_MIN
        async with httpx.AsyncClient(timeout=self.long_poll + HTTP_TIMEOUT) as client:
            while not self._stop.is_set():
                row = await asyncio.to_thread(self.processor.transmitter, self.transmitter_id)
                if row is None or row.delivery_method != "poll" or row.status == "disabled":
                    return
                try:
                    await self.poll_once(client, row)
                    backoff = BACKOFF_MIN
                except (httpx.HTTPError, UpstreamError, ConfigError) as exc:
                    log.warning(
                        "poll of %s failed (%s); retrying in %.0fs", row.issuer, exc, backoff
                    )
                    await self._pause(backoff)
                    backoff = min(BACKOFF_MAX, backoff * 2)

    async def poll_once(self, client: httpx.AsyncClient, row: SsfTransmitter) -> int:
        """One poll request: send the pending acks and errors, process what comes back.
        Returns how many SETs arrived."""
        acks, errors = list(self.acks), dict(self.errors)
        body = {
            "maxEvents": self.max_events,
            "returnImmediately": False,
            "ack": acks,
            "setErrs": errors,
        }
        headers = {"Accept": "application/json"}
        if row.auth_token:
            headers["Authorization"] = f"Bearer {row.auth_token}"
        response = await client.post(
            check_url(row.endpoint_url, "poll endpoint"), json=body, headers=headers
        )
        if response.status_code != 200:
            raise UpstreamError(
                f"poll answered HTTP {response.status_code}", code="ssf_transmitter_error"
            )
        doc = _json(response, "poll")
        self.polls += 1
        # The transmitter has them now (RFC 8936 §2.4.1: acked SETs are not redelivered).
        self.acks = [a for a in self.acks if a not in acks]
        for jti in errors:
            self.errors.pop(jti, None)
        sets = doc.get("sets", {})
        if not isinstance(sets, dict):
            raise UpstreamError("poll: sets is not an object", code="ssf_transmitter_error")
        for jti, token in sets.items():
            if not isinstance(token, str):
                self.errors[jti] = {"err": "invalid_request", "description": "not a SET"}
                continue
            try:
                await asyncio.to_thread(self.processor.process, row, token)
                self.acks.append(jti)
            except ReplayedSet:
                self.acks.append(jti)  # processed before; our earlier ack was lost
            except SetError as exc:
                log.info("polled SET %s from %s refused: %s", jti, row.issuer, exc.code)
                self.errors[jti] = {"err": exc.code, "description": exc.message}
        return len(sets)


class SignalReceiver:
    """Runs a :class:`Poller` for every enabled poll-mode transmitter of the store, picking
    up added and removed ones every ``refresh_seconds`` (and at once on :meth:`wake`)."""

    def __init__(
        self,
        ctx: ServiceContext,
        processor: SetProcessor | None = None,
        *,
        refresh_seconds: float = 5.0,
        long_poll: float = LONG_POLL_SECONDS,
    ) -> None:
        self.ctx = ctx
        self.processor = processor or SetProcessor(ctx)
        self.refresh_seconds = refresh_seconds
        self.long_poll = long_poll
        self.pollers: dict[str, tuple[Poller, asyncio.Task[Any]]] = {}
        self._task: asyncio.Task[Any] | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] = lambda: None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.ctx.bus.subscribe(self._on_bus)
        self._task = spawn(self._supervise(), name="ssf poll supervisor")

    def _on_bus(self, event: BusEvent) -> None:
        if event.topic == TRANSMITTERS_CHANGED:
            self.wake()

    def wake(self) -> None:
        """Re-read the transmitters now (callable from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self) -> None:
        self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for poller, task in self.pollers.values():
            poller.stop()
            task.cancel()
        for _, task in self.pollers.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.pollers.clear()

    def _wanted(self) -> dict[str, str]:
        from sqlalchemy import select

        with self.ctx.store.session() as s:
            rows = s.scalars(
                select(SsfTransmitter).where(
                    SsfTransmitter.delivery_method == "poll", SsfTransmitter.status != "disabled"
                )
            )
            return {r.id: r.issuer for r in rows if r.endpoint_url}

    async def _supervise(self) -> None:
        while True:
            try:
                wanted = await asyncio.to_thread(self._wanted)
            except StoreError as exc:
                log.error("cannot read the SSF transmitters: %s", exc)
                wanted = {tid: "" for tid in self.pollers}
            for tid in list(self.pollers):
                poller, task = self.pollers[tid]
                if tid not in wanted or task.done():
                    poller.stop()
                    task.cancel()
                    del self.pollers[tid]
            for tid, issuer in wanted.items():
                if tid not in self.pollers:
                    poller = Poller(self.processor, tid, long_poll=self.long_poll)
                    task = spawn(poller.run(), name=f"ssf poll {issuer}")
                    self.pollers[tid] = (poller, task)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_seconds):
                    await self._wake.wait()
            self._wake.clear()
