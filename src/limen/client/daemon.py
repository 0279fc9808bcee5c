"""The long-running client: ``limen client up``.

One process holds the edge session, the forwarding profile, the packet-filter rules and the
transparent listener, and answers ``status``, ``pause``, ``resume``, ``traffic`` and ``down``
on a local control socket.

* **Profile updates by polling.** Every ``poll_interval`` (2 s) the daemon asks the API for
  ``/api/v1/me/forwarding-profile?known_version=N``; an unchanged profile costs a ``304``. The
  edge has no client control stream yet, so a push (``profile_update``, wire/control.py) is not
  possible; polling gives "within seconds" and survives API restarts without reconnect logic.
  The last profile is cached (``profile.json``, 0600) so hardening still applies when the API
  is unreachable at start.
* **Edge health.** A probe every ``health_interval`` (re)opens the edge connections; a flow
  that finds the edge unreachable marks it down at once. Down switches the rules to hardening
  (``block`` → reject, ``pass`` → direct); up switches them back.
* **Private names.** With capture on, a DNS stub (:class:`~limen.client.dns.DnsStub`) on
  :data:`STUB_ADDRESS` becomes the system resolver (:mod:`limen.client.resolvconf`). Names of
  tunnel name rules get synthetic addresses (:class:`~limen.client.forwarding.SyntheticMap`);
  the packet filter redirects the synthetic range to the listener, which maps the address
  back to the name, so the connector resolves the real name on the private side. Other
  private names go to the edge, public ones to the servers the original resolv.conf named.
* **Cleanup.** The table is deleted on every exit path the process sees (return, SIGTERM,
  SIGINT, an error), a stale table left by a killed daemon is deleted at the next start, and
  ``limen client down`` deletes it even when no daemon runs.
* **Control socket.** ``<client dir>/control.sock``, mode 0600 and owned by the owner of the
  client directory (so a user can control a daemon root runs for them). One JSON request line
  per connection, one JSON answer line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import httpx

from limen.client import auth
from limen.client.dns import DnsStub, synthetic_answer
from limen.client.forwarding import (
    DEFAULT_SYNTHETIC_RANGE,
    Action,
    ForwardingProfile,
    SyntheticMap,
    parse_profile,
)
from limen.client.profile import StateFile
from limen.client.resolvconf import (
    RESOLV_CONF,
    ResolvConf,
    ResolvedLink,
    nameservers,
    uses_resolved,
)
from limen.client.transparent import (
    SOCKET_MARK,
    CaptureState,
    NftTable,
    PolicyRoute,
    TransparentListener,
    render_ruleset,
)
from limen.client.tunnel import EdgeSession, FlowRefused
from limen.client.udp import TransparentUdp
from limen.errors import AuthError, ConfigError, LimenError, RemoteProtocolError
from limen.files import write_private
from limen.net.resolver import DnsResolver, Upstream
from limen.net.tasks import spawn

log = logging.getLogger(__name__)

PROFILE_PATH = "/api/v1/me/forwarding-profile"
#: A control request is one short JSON line; anything longer is not ours.
MAX_CONTROL_LINE = 64 * 1024
#: Opaque value of the health probe's yamux ping ("LMN?").
PROBE_PING = 0x4C4D4E3F
#: Recent log lines kept for ``collect-logs``.
LOG_LINES = 500
#: Where the DNS stub listens under ``limen client up``: on loopback, but not 127.0.0.53 or
#: 127.0.0.54 (systemd-resolved's own stubs), so both can run side by side.
STUB_ADDRESS = "127.0.53.1"
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")


def redact(text: str) -> str:
    """Remove anything that looks like a token (a JWT, a bearer credential)."""
    return _BEARER.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", text))


def control_path(client_dir: Path) -> Path:
    env = os.environ.get("LIMEN_CLIENT_CONTROL")
    return Path(env) if env else client_dir / "control.sock"


def profile_cache_path(client_dir: Path) -> Path:
    return client_dir / "profile.json"


def undo_stale_resolver(client_dir: Path, resolv_conf: Path = RESOLV_CONF) -> list[str]:
    """Undo the resolver change of a client that died (for ``limen client down`` with no
    daemon running): what was undone, for the user."""
    done: list[str] = []
    if ResolvConf(client_dir, resolv_conf).recover():
        done.append(f"restored {resolv_conf}")
    if ResolvedLink().recover():
        done.append("removed the systemd-resolved link limen0")
    if PolicyRoute().remove():
        done.append("removed the UDP capture routing rule")
    return done


class DaemonNotRunning(LimenError):
    code = "daemon_not_running"
    http_status = 503


def control_call(path: Path, command: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one command to a running daemon; its answer. :class:`DaemonNotRunning` when none
    answers; a :class:`LimenError` with the daemon's code when it refuses."""
    request = json.dumps({"cmd": command, **args}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(request)
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > 16 * 1024 * 1024:
                    raise RemoteProtocolError("control answer too large", code="control_too_large")
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonNotRunning(
            f"no `limen client up` is running (nothing answers on {path})"
        ) from exc
    except OSError as exc:
        raise DaemonNotRunning(f"cannot talk to the client daemon on {path}: {exc}") from exc
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise RemoteProtocolError(
            "the daemon's answer is not JSON", code="control_malformed"
        ) from exc
    if not isinstance(answer, dict):
        raise RemoteProtocolError("the daemon's answer is not an object", code="control_malformed")
    if not answer.get("ok", False):
        raise LimenError(str(answer.get("message", "")), code=str(answer.get("error", "error")))
    return answer


class _RingHandler(logging.Handler):
    def __init__(self, lines: collections.deque[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(redact(self.format(record)))
        except (ValueError, TypeError):  # a malformed %-format in someone's log call
            self.handleError(record)


class ClientDaemon:
    """``limen client up``. ``capture=False`` runs without nftables (profile, control socket
    and status only): for hosts without root, and for tests."""

    def __init__(
        self,
        state_file: StateFile,
        *,
        capture: bool = True,
        listen_port: int = 0,
        poll_interval: float = 2.0,
        health_interval: float = 2.0,
        nft: NftTable | None = None,
        private_dns: bool = True,
        dns_address: str = STUB_ADDRESS,
        synthetic_range: str = DEFAULT_SYNTHETIC_RANGE,
        resolv_conf: Path = RESOLV_CONF,
    ) -> None:
        self.state_file = state_file
        self.client_dir = state_file.directory
        self.control_path = control_path(self.client_dir)
        self.capture = capture
        self.listen_port = listen_port
        self.poll_interval = poll_interval
        self.health_interval = health_interval
        self.nft = nft
        self.profile = ForwardingProfile()
        self.profile_source = "none"
        self.profile_fetched_at = 0.0
        self.username = ""
        self.api_error = ""
        self.edge_up = False
        self.edge_error = ""
        self.paused = False
        self.paused_reason = ""
        self.capture_state = CaptureState.PAUSED
        self.session: EdgeSession | None = None
        self.listener: TransparentListener | None = None
        self.excludes: list[tuple[str, int]] = []
        self.log_lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.started_at = time.time()
        self._script = ""
        self._apply_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._http: httpx.Client | None = None
        self._control: asyncio.Server | None = None
        self._ready = asyncio.Event()
        self.dns_enabled = private_dns and capture
        self.dns_address = dns_address
        self.synthetic = SyntheticMap(synthetic_range)
        self.stub: DnsStub | None = None
        self.resolv = ResolvConf(self.client_dir, resolv_conf)
        self.resolved: ResolvedLink | None = None
        self.dns_mode = "off"
        self.udp: TransparentUdp | None = None
        self.policy_route: PolicyRoute | None = None

    # --- life cycle ---------------------------------------------------------------------------

    async def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Run until ``down`` (or cancellation); everything is undone on the way out."""
        ring = _RingHandler(self.log_lines)
        logging.getLogger().addHandler(ring)
        try:
            await self._run(ready)
        finally:
            self._cleanup()
            logging.getLogger().removeHandler(ring)

    async def _run(self, ready: Callable[[str], None] | None) -> None:
        await self._refuse_second_daemon()
        state = self.state_file.require()
        self.username = state.username
        self.session = EdgeSession(state, state_file=self.state_file)
        if self.capture:
            if self.nft is None:
                self.nft = NftTable()
            if await asyncio.to_thread(self.nft.delete):
                log.warning("removed a stale `inet limen` table left by an earlier client")
        self._load_cached_profile()
        await self._poll_profile()
        self.excludes = await asyncio.to_thread(self._resolve_excludes)
        if self.capture:
            self.listener = TransparentListener(
                self.session,
                profile=lambda: self.profile,
                edge_up=lambda: self.edge_up,
                paused=lambda: self.paused,
                on_edge_unreachable=self._edge_unreachable,
                synthetic=self.synthetic if self.dns_enabled else None,
            )
            await self.listener.start(self.listen_port)
            await self._start_udp()
        if self.dns_enabled:
            await self._start_dns()
        await self._probe_edge()
        await self._apply()
        await self._serve_control()
        tasks = [
            spawn(self._poll_loop(), name="client profile poll"),
            spawn(self._health_loop(), name="client edge health"),
        ]
        self._ready.set()
        if ready is not None:
            ready(self._ready_line())
        try:
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _ready_line(self) -> str:
        p = self.profile
        mode = "transparent capture" if self.capture else "no capture (--no-capture)"
        return (
            f"limen client up: {mode}; profile {p.name} version {p.version} "
            f"({len(p.rules)} rules, from {self.profile_source}); edge "
            f"{'up' if self.edge_up else 'unreachable'}; control socket {self.control_path}"
        )

    def stop(self) -> None:
        self._stop.set()

    def _cleanup(self) -> None:
        # Synchronous on purpose: runs on cancellation too, and must finish before exit. The
        # control socket goes last: `limen client down` waits for it to vanish, and by then
        # the rules and the resolver change are gone.
        if self.listener is not None:
            self.listener.close()
        if self.udp is not None:
            self.udp.close()
        self._stop_dns()
        if self.capture and self.nft is not None:
            try:
                self.nft.delete()
            except LimenError as exc:
                log.error("could not remove the nftables table: %s", exc.message)
        if self.policy_route is not None:
            self.policy_route.remove()
        if self._control is not None:
            self._control.close()
            self._control = None
            with contextlib.suppress(OSError):
                self.control_path.unlink()
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.session is not None:
            for conn in self.session.conns:
                conn.close()

    async def _refuse_second_daemon(self) -> None:
        try:
            await asyncio.to_thread(control_call, self.control_path, "ping", 2.0)
        except DaemonNotRunning:
            return
        except LimenError:
            pass
        raise ConfigError(
            f"a client daemon is already running (control socket {self.control_path}); "
            "stop it with `limen client down`",
            code="already_running",
        )

    def _resolve_excludes(self) -> list[tuple[str, int]]:
        """The edge's and the API's addresses: the client's own traffic is never captured."""
        assert self.session is not None
        targets = [(self.session.edge_host, self.session.edge_port)]
        api = urllib.parse.urlsplit(self.session.state.api_url)
        if api.hostname:
            targets.append((api.hostname, api.port or 443))
        out: list[tuple[str, int]] = []
        for host, port in targets:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot resolve %s: %s", host, exc)
                continue
            for info in infos:
                addr = (str(info[4][0]).split("%", 1)[0], port)
                if addr not in out:
                    out.append(addr)
        return out

    # --- UDP -----------------------------------------------------------------------------------

    async def _start_udp(self) -> None:
        """The tproxy listener and its routing rule (a stale rule is replaced)."""
        assert self.session is not None
        route = PolicyRoute()
        try:
            await asyncio.to_thread(route.install)
        except (LimenError, OSError) as exc:
            log.warning("no transparent UDP capture: %s", exc)
            return
        self.policy_route = route
        udp = TransparentUdp(
            self.session,
            profile=lambda: self.profile,
            tunnel_allowed=self._udp_allowed,
            mark=SOCKET_MARK,
        )
        try:
            udp.start()
        except OSError as exc:
            log.warning("no transparent UDP capture: %s", exc)
            return
        self.udp = udp

    def _udp_allowed(self, host: str, port: int) -> bool:
        rule = self.profile.match(host, port, "udp").rule
        return (
            rule is not None and rule.action is Action.TUNNEL and self.edge_up and not self.paused
        )

    # --- the DNS stub -------------------------------------------------------------------------

    async def _start_dns(self) -> None:
        """Recover a resolver change a dead client left, start the stub, take over."""
        assert self.session is not None
        if await asyncio.to_thread(self.resolv.recover):
            log.warning("restored %s left changed by an earlier client", self.resolv.path)
        link = ResolvedLink()
        if await asyncio.to_thread(link.recover):
            log.warning("removed the %s link left by an earlier client", link.link)
        try:
            text = await asyncio.to_thread(self.resolv.path.read_text)
        except OSError as exc:
            raise ConfigError(f"cannot read {self.resolv.path}: {exc}") from exc
        resolved = uses_resolved(text)
        upstreams = [u for u in nameservers(text) if u.host != self.dns_address]
        if not upstreams:
            log.warning("%s names no DNS server: public names will fail", self.resolv.path)
            upstreams = [Upstream("127.0.0.1")]
        self.stub = DnsStub(self.session, upstream=DnsResolver(upstreams), local=self._local_answer)
        self.stub.suffixes = list(self.profile.dns_suffixes)
        await self.stub.start(self.dns_address, 53, require_suffixes=False)
        if resolved:
            self.resolved = link
            await asyncio.to_thread(link.take_over, self.dns_address, self._routing_domains())
            self.dns_mode = "systemd-resolved"
        else:
            await asyncio.to_thread(self.resolv.take_over, self.dns_address)
            self.dns_mode = "resolv.conf"

    def _stop_dns(self) -> None:
        if self.stub is not None:
            self.stub.close()
        try:
            if self.resolved is not None:
                self.resolved.restore()
            self.resolv.restore()
        except (OSError, LimenError) as exc:
            log.error("could not undo the resolver change: %s", exc)
        self.dns_mode = "off"

    def _local_answer(self, query: dns.message.Message) -> bytes | None:
        assert self.stub is not None
        return synthetic_answer(
            query,
            self.profile,
            self.synthetic,
            time.monotonic(),
            suffixes=self.stub.suffixes,
            edge_up=self.edge_up,
            paused=self.paused,
        )

    def _routing_domains(self) -> list[str]:
        """The names systemd-resolved must send to the stub."""
        names = [r.parsed.name for r in self.profile.name_rules() if r.action is Action.TUNNEL]
        suffixes = self.stub.suffixes if self.stub is not None else []
        return [*names, *suffixes, *self.profile.dns_suffixes]

    # --- the packet filter --------------------------------------------------------------------

    def _wanted_state(self) -> CaptureState:
        if self.paused:
            return CaptureState.PAUSED
        return CaptureState.ACTIVE if self.edge_up else CaptureState.EDGE_DOWN

    async def _apply(self) -> None:
        async with self._apply_lock:
            self.capture_state = self._wanted_state()
            if not self.capture or self.nft is None or self.listener is None:
                return
            script = render_ruleset(
                self.profile,
                state=self.capture_state,
                listen_ports=self.listener.ports,
                excludes=self.excludes,
                owner=f"limen client pid {os.getpid()}",
                synthetic=str(self.synthetic.network) if self.stub is not None else None,
                udp_port=self.udp.port if self.udp is not None else None,
            )
            if self.resolved is not None:
                await asyncio.to_thread(self.resolved.set_domains, self._routing_domains())
            if script == self._script:
                return
            await asyncio.to_thread(self.nft.apply, script)
            self._script = script
            log.info(
                "packet filter: %s, profile version %d", self.capture_state, self.profile.version
            )

    def _reapply_soon(self) -> None:
        spawn(self._apply_logged(), name="client apply rules")

    async def _apply_logged(self) -> None:
        try:
            await self._apply()
        except LimenError as exc:
            log.error("could not update the packet filter: %s", exc.message)

    # --- edge health --------------------------------------------------------------------------

    def _edge_unreachable(self) -> None:
        if self.edge_up:
            log.warning("the edge is unreachable: hardening rules apply")
            self.edge_up = False
            self.edge_error = "a flow could not reach the edge"
            self._reapply_soon()

    async def _probe_edge(self) -> None:
        assert self.session is not None
        live = [c for c in self.session.conns if c.is_open]
        for conn in live:
            # A ping makes a connection whose path is gone fail now (a reset, an unreachable
            # route) rather than at the 45 s keepalive; the answer is a sign of life.
            conn.session.ping(PROBE_PING)
            conn.flush()
        if live:
            up, error = True, ""
        else:
            try:
                async with asyncio.timeout(5.0):
                    await self.session.warm_up()
                up, error = True, ""
            except FlowRefused as exc:
                up, error = False, exc.message
            except (OSError, TimeoutError) as exc:
                up, error = False, f"{type(exc).__name__}: {exc}"
        if up != self.edge_up:
            log.info("edge %s%s", "up" if up else "unreachable", f": {error}" if error else "")
        self.edge_up, self.edge_error = up, error

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            before = self.edge_up
            await self._probe_edge()
            if self.edge_up != before:
                await self._apply_logged()

    # --- the profile --------------------------------------------------------------------------

    def _load_cached_profile(self) -> None:
        path = profile_cache_path(self.client_dir)
        try:
            self.profile = parse_profile(json.loads(path.read_text()))
        except FileNotFoundError:
            return
        except (OSError, ValueError, LimenError) as exc:
            log.warning("ignoring the cached profile %s: %s", path, exc)
            return
        self.profile_source = "cache"

    def _save_cached_profile(self, raw: dict[str, Any]) -> None:
        path = profile_cache_path(self.client_dir)
        try:
            write_private(path, json.dumps(raw, indent=2), atomic=True)
        except OSError as exc:
            log.warning("cannot cache the profile in %s: %s", path, exc)

    def _fetch_blocking(self, token: str, known: int | None) -> tuple[int, dict[str, Any] | None]:
        assert self.session is not None
        if self._http is None:
            self._http = auth.http_client(self.session.state, timeout=10.0)
        params = {"known_version": str(known)} if known is not None else {}
        response = self._http.get(
            PROFILE_PATH, params=params, headers={"Authorization": f"Bearer {token}"}
        )
        if response.status_code != 200:
            body: dict[str, Any] | None = None
            with contextlib.suppress(ValueError):
                parsed = response.json()
                body = parsed if isinstance(parsed, dict) else None
            return response.status_code, body
        data = response.json()
        return 200, data if isinstance(data, dict) else None

    async def _poll_profile(self) -> bool:
        """Fetch the profile if it changed; True when a new one was installed."""
        assert self.session is not None
        known = self.profile.version if self.profile_source == "api" else None
        try:
            for attempt in range(2):
                token = await self.session.access_token(force_refresh=attempt > 0)
                status, body = await asyncio.to_thread(self._fetch_blocking, token, known)
                if status != 401:
                    break
        except (httpx.HTTPError, OSError) as exc:
            self._api_problem(f"cannot reach the API: {exc}")
            return False
        except AuthError as exc:
            self._api_problem(f"{exc.code}: {exc.message}; sign in again (limen client login)")
            return False
        if status == 304:
            self.api_error = ""
            return False
        if status != 200 or body is None:
            error = (body or {}).get("error", "") if body else ""
            self._api_problem(f"profile request answered {status} {error}".strip())
            return False
        try:
            profile = parse_profile(body)
        except RemoteProtocolError as exc:
            self._api_problem(exc.message)
            return False
        self.api_error = ""
        self.username = str(body.get("username") or self.username)
        self.profile_fetched_at = time.time()
        changed = profile != self.profile or self.profile_source != "api"
        self.profile, self.profile_source = profile, "api"
        if changed:
            await asyncio.to_thread(self._save_cached_profile, body)
            log.info(
                "forwarding profile version %d: %d rules (%s)",
                profile.version,
                len(profile.rules),
                "enabled" if profile.enabled else "disabled",
            )
            if self.paused and not profile.allow_pause:
                self.paused, self.paused_reason = False, ""
                log.warning("the administrator no longer allows pausing: resumed")
        return changed

    def _api_problem(self, message: str) -> None:
        if message != self.api_error:
            log.warning("forwarding profile: %s", message)
        self.api_error = message

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            if await self._poll_profile():
                await self._apply_logged()

    # --- control ------------------------------------------------------------------------------

    async def _serve_control(self) -> None:
        path = self.control_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if len(str(path).encode()) > 100:
            raise ConfigError(f"control socket path too long for AF_UNIX: {path}")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # nobody answered on it (checked at start): a leftover
        old = os.umask(0o177)
        try:
            self._control = await asyncio.start_unix_server(self._control_client, str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        with contextlib.suppress(OSError):
            owner = self.client_dir.stat()
            if (owner.st_uid, owner.st_gid) != (os.geteuid(), os.getegid()):
                os.chown(path, owner.st_uid, owner.st_gid)

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(10.0):
                line = await reader.readuntil(b"\n")
            if len(line) > MAX_CONTROL_LINE:
                raise RemoteProtocolError("request too long", code="control_too_large")
            request = json.loads(line)
            if not isinstance(request, dict):
                raise RemoteProtocolError("request is not an object", code="control_malformed")
            answer = await self.handle(request)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            answer = {"ok": False, "error": "control_malformed", "message": "no request line"}
        except ValueError:
            answer = {"ok": False, "error": "control_malformed", "message": "not JSON"}
        except LimenError as exc:
            answer = {"ok": False, "error": exc.code, "message": exc.message}
        try:
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one control command (``status``, ``pause``, ``resume``, ``traffic``,
        ``profile``, ``logs``, ``down``, ``ping``)."""
        command = request.get("cmd")
        if command == "ping":
            return {"ok": True}
        if command == "status":
            return {"ok": True, **self.status()}
        if command == "pause":
            if not self.profile.allow_pause:
                raise ConfigError(
                    "your administrator does not allow pausing Limen", code="pause_forbidden"
                )
            self.paused = True
            reason = str(request.get("reason") or "paused by the user")[:200]
            self.paused_reason = f"{reason} at {time.strftime('%H:%M:%S')}"
            log.info("paused: %s", reason)
            await self._apply()
            return {"ok": True, **self.status()}
        if command == "resume":
            self.paused, self.paused_reason = False, ""
            log.info("resumed")
            await self._apply()
            return {"ok": True, **self.status()}
        if command == "traffic":
            flows = self.listener.flows.snapshot() if self.listener is not None else []
            return {"ok": True, "flows": flows}
        if command == "profile":
            return {
                "ok": True,
                "profile": self.profile.to_json(),
                "source": self.profile_source,
                "edge_up": self.edge_up,
                "paused": self.paused,
            }
        if command == "logs":
            return {"ok": True, "lines": list(self.log_lines)}
        if command == "down":
            log.info("stopping: `limen client down`")
            self.stop()
            return {"ok": True, "stopping": True}
        raise ConfigError(f"unknown control command {command!r}", code="unknown_command")

    def status(self) -> dict[str, Any]:
        """What ``limen client status`` shows (no secrets)."""
        session = self.session
        conns = [c for c in session.conns if c.is_open] if session is not None else []
        state = session.state if session is not None else None
        p = self.profile
        why = self.paused_reason
        if session is not None and session.paused_reason:
            why = why or f"access refused by the edge: {session.paused_reason}"
        return {
            "pid": os.getpid(),
            "started_at": round(self.started_at, 3),
            "user": self.username,
            "device_id": state.device_id if state else "",
            "edge": state.edge if state else "",
            "api": state.api_url if state else "",
            "mode": "transparent" if self.capture else "no-capture",
            "profile": {
                "name": p.name,
                "version": p.version,
                "enabled": p.enabled,
                "rules": len(p.rules),
                "ip_rules": len(p.ip_rules("tcp")),
                "name_rules": len(p.name_rules()),
                "allow_pause": p.allow_pause,
                "hardening": p.hardening,
                "source": self.profile_source,
                "fetched_at": round(self.profile_fetched_at, 3),
            },
            "capture": {
                "state": self.capture_state.value,
                "table": "inet limen" if self.capture else "",
                "listen": self.listener.ports if self.listener is not None else {},
                "udp_listen": self.udp.port if self.udp is not None else 0,
            },
            "tunnels": {
                "connections": len(conns),
                "streams": sum(len(c.streams) for c in conns),
                "open_flows": len(self.listener.flows) if self.listener is not None else 0,
            },
            "health": {
                "edge": "up" if self.edge_up else "unreachable",
                "edge_error": self.edge_error,
                "api": "error" if self.api_error else "ok",
                "api_error": self.api_error,
            },
            "paused": self.paused,
            "paused_reason": why,
            "dns": {
                "mode": self.dns_mode,
                "stub": f"{self.dns_address}:53" if self.stub is not None else "",
                "synthetic_range": str(self.synthetic.network),
                "mappings": len(self.synthetic),
                "suffixes": list(self.stub.suffixes) if self.stub is not None else [],
                "private_queries": self.stub.private_queries if self.stub is not None else 0,
                "public_queries": self.stub.public_queries if self.stub is not None else 0,
            },
        }

    async def wait_ready(self) -> None:
        """Until the daemon serves (for tests and embedding)."""
        await self._ready.wait()


__all__ = [
    "STUB_ADDRESS",
    "ClientDaemon",
    "DaemonNotRunning",
    "control_call",
    "control_path",
    "profile_cache_path",
    "redact",
    "undo_stale_resolver",
]
