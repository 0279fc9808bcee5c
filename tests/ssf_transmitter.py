"""A tiny SSF transmitter for tests (its own keys and JWKS, discovery, one stream, push and
poll delivery) and a helper that serves an ASGI app on a loopback port. Shared by the
receiver's component tests and the CAE data-plane and end-to-end tests."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from limen.net.tasks import spawn
from limen.signals import events as ev
from tests.unit.test_set_validation import jwk, sign_set

MGMT_TOKEN = "transmitter-management-token"


def bind_loopback(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serve(app: FastAPI, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """``app`` on a port of ``host`` (loopback by default); yields its base URL."""
    sock = bind_loopback(host)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=1
        )
    )
    task = spawn(server.serve(sockets=[sock]), name=f"test server {port}")
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    assert server.started
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task


@dataclass
class Transmitter:
    """A tiny SSF transmitter: its own keys and JWKS, discovery, one stream, push, poll."""

    base: str = ""
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    kid: str = "k1"
    audience: str = "https://limen.test"
    stream: dict[str, Any] | None = None
    pending: dict[str, str] = field(default_factory=dict)
    acked: list[str] = field(default_factory=list)
    set_errs: dict[str, Any] = field(default_factory=dict)
    polls: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    pushed: list[httpx.Response] = field(default_factory=list)
    #: How push deliveries verify the receiver's certificate (its CA, for Limen's HTTPS API).
    verify: ssl.SSLContext | bool = True

    @property
    def root(self) -> str:
        """Where the transmitter's app is served (the issuer has a path, ``/tenant1``)."""
        return self.base.rsplit("/", 1)[0]

    def rotate(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = f"k{secrets.token_hex(2)}"

    def make_set(
        self, event_type: str, event: dict[str, Any], sub_id: dict[str, Any] | None, **extra: Any
    ) -> tuple[str, str]:
        """A signed SET and its jti."""
        jti = secrets.token_hex(8)
        alg = extra.pop("_alg", None)
        claims: dict[str, Any] = {
            "iss": self.base,
            "aud": self.audience,
            "iat": time.time(),
            "jti": jti,
            "events": {event_type: event},
        }
        if sub_id is not None:
            claims["sub_id"] = sub_id
        claims.update(extra)
        return sign_set(claims, self.key, self.kid, alg=alg), jti

    async def push(
        self, token: str, *, auth: str | None = None, content_type: str = "application/secevent+jwt"
    ) -> httpx.Response:
        assert self.stream is not None
        delivery = self.stream["delivery"]
        headers = {
            "Content-Type": content_type,
            "Authorization": auth or delivery["authorization_header"],
        }
        async with httpx.AsyncClient(verify=self.verify) as client:
            response = await client.post(delivery["endpoint_url"], content=token, headers=headers)
        self.pushed.append(response)
        return response

    async def deliver(self, token: str, jti: str) -> None:
        """Push or queue for poll, whichever the stream uses."""
        assert self.stream is not None
        if self.stream["delivery"]["method"].endswith("8935"):
            response = await self.push(token)
            assert response.status_code == 202, response.text
        else:
            self.pending[jti] = token
            self.wakeup.set()

    def app(self) -> FastAPI:
        app = FastAPI()

        def authorized(request: Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {MGMT_TOKEN}"

        @app.get("/.well-known/ssf-configuration/tenant1")
        def metadata() -> dict[str, Any]:
            b = self.root
            return {
                "spec_version": "1_0",
                "issuer": self.base,
                "jwks_uri": f"{b}/jwks",
                "delivery_methods_supported": ["urn:ietf:rfc:8935", "urn:ietf:rfc:8936"],
                "configuration_endpoint": f"{b}/ssf/stream",
                "status_endpoint": f"{b}/ssf/status",
                "add_subject_endpoint": f"{b}/ssf/subjects:add",
                "verification_endpoint": f"{b}/ssf/verify",
                "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6749"}],
            }

        @app.get("/jwks")
        def jwks() -> dict[str, Any]:
            return {"keys": [jwk(self.key, self.kid)]}

        @app.post("/ssf/stream", status_code=201)
        async def create(request: Request) -> Any:
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            if self.stream is not None:
                return JSONResponse({"error": "exists"}, status_code=409)
            config = await request.json()
            delivery = dict(config["delivery"])
            if delivery["method"] == "urn:ietf:rfc:8936":
                delivery["endpoint_url"] = f"{self.root}/ssf/poll"
            self.stream = {
                "stream_id": "str_1",
                "iss": self.base,
                "aud": self.audience,
                "delivery": delivery,
                "events_requested": config["events_requested"],
                "events_delivered": [
                    e for e in config["events_requested"] if "caep" in e or "risc" in e
                ],
            }
            return {k: v for k, v in self.stream.items() if k != "delivery"} | {
                "delivery": {k: v for k, v in delivery.items() if k != "authorization_header"}
            }

        @app.get("/ssf/stream")
        def read(request: Request) -> Any:
            if not authorized(request) or self.stream is None:
                return JSONResponse({"error": "no"}, status_code=404)
            return {k: v for k, v in self.stream.items() if k != "delivery"}

        @app.delete("/ssf/stream", status_code=204)
        def remove(request: Request, stream_id: str) -> Response:
            assert authorized(request) and stream_id == "str_1"
            self.stream = None
            return Response(status_code=204)

        @app.post("/ssf/verify", status_code=204)
        async def verify(request: Request) -> Response:
            assert authorized(request)
            body = await request.json()
            assert body["stream_id"] == "str_1"
            token, jti = self.make_set(
                ev.VERIFICATION, {"state": body["state"]}, {"format": "opaque", "id": "str_1"}
            )
            await self.deliver(token, jti)
            return Response(status_code=204)

        @app.post("/ssf/poll")
        async def poll(request: Request) -> Any:
            assert authorized(request)
            body = await request.json()
            assert set(body) == {"maxEvents", "returnImmediately", "ack", "setErrs"}
            self.polls += 1
            for jti in body["ack"]:
                self.pending.pop(jti, None)
                self.acked.append(jti)
            self.set_errs.update(body["setErrs"])
            for jti in body["setErrs"]:
                self.pending.pop(jti, None)
            if not self.pending and not body["returnImmediately"]:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):  # a short long-poll keeps shutdown quick
                        await self.wakeup.wait()
            return {"sets": dict(self.pending), "moreAvailable": False}

        return app


# --- as a process (the end-to-end tests run it inside the edge namespace) ---------------------


def control_app(transmitter: Transmitter) -> FastAPI:
    """The transmitter's app plus test controls: ``POST /test/emit`` signs a SET and delivers
    it (push: after the receiver's answer; poll: queued), answering with its jti and the
    ``time.monotonic()`` at which the delivery returned; ``GET /test/state`` says whether the
    stream exists, how often the receiver polled and which SETs it acknowledged."""
    app = transmitter.app()

    @app.post("/test/emit")
    async def emit(request: Request) -> dict[str, Any]:
        body = await request.json()
        token, jti = transmitter.make_set(
            str(body.get("event_type", ev.SESSION_REVOKED)),
            {"event_timestamp": time.time(), "reason_admin": {"en": "end-to-end test"}},
            {"format": "iss_sub", "iss": transmitter.base, "sub": str(body["sub"])},
        )
        await transmitter.deliver(token, jti)
        return {"jti": jti, "delivered_at": time.monotonic()}

    @app.get("/test/state")
    def state() -> dict[str, Any]:
        return {
            "stream": transmitter.stream is not None,
            "polls": transmitter.polls,
            "acked": list(transmitter.acked),
        }

    return app


async def _main(port: int, ca_file: str) -> None:
    transmitter = Transmitter(base=f"http://127.0.0.1:{port}/tenant1")
    transmitter.verify = ssl.create_default_context(cafile=ca_file)
    server = uvicorn.Server(
        uvicorn.Config(
            control_app(transmitter),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    await server.serve()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A test SSF transmitter on 127.0.0.1.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-file", required=True, help="CA of the receiver's HTTPS API")
    args = parser.parse_args()
    asyncio.run(_main(args.port, args.ca_file))
