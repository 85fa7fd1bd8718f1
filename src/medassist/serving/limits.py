"""What keeps one server usable by many clients: bounded admission, disconnects noticed at
once, and which Host names a keyless loopback server answers.

Generation is CPU-bound and blocking, so it never runs on the event loop. At most
``max_concurrency`` generations run at once and ``max_queue`` more wait; anything beyond is
refused at once with 429 instead of piling up. A client that leaves (while waiting or while
its answer is generated) is noticed when it leaves, not when its answer is done: its
generation stops at the next token and gives its slot back.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Callable

import h11
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from medassist.config import ServeConfig
from medassist.serving.openai import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(settings: ServeConfig) -> list[str]:
    """Host header values to accept (Starlette's TrustedHostMiddleware patterns).

    A keyless server on loopback answers only loopback names: a web page elsewhere cannot
    rebind its own domain name to 127.0.0.1 and use the server (DNS rebinding). With a key,
    or listening beyond this machine, any name (``*``), unless ``allowed_hosts`` says.
    """
    if settings.allowed_hosts:
        return list(settings.allowed_hosts)
    if settings.api_key or not is_loopback(settings.host):
        return ["*"]
    own = f"[{settings.host}]" if ":" in settings.host else settings.host
    return list(dict.fromkeys([*LOOPBACK_NAMES, own]))


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over this server's limit of {limit} bytes",
                         headers={"Connection": "close"})  # stop reading: a chunked body may never end


class BodyLimit:
    """Pure ASGI middleware: refuse a request body over ``max_bytes`` with 413.

    Counted on the bytes received, not only the declared ``Content-Length``: a chunked upload
    declares none. Reading stops at the limit (``Connection: close``), so nothing beyond it
    is read or held. The 413 is raised as an HTTPException, so the app answers it in its own
    error shape.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        over = declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes)
        received = 0

        async def limited() -> Message:
            nonlocal received
            if over:  # declared too large (or unreadable): refuse before reading a byte
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class LingeringClose(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a lingering close, as nginx's ``lingering_close``.

    When the server closes a connection whose client is still sending its body (a 413 in the
    middle of an upload), closing at once leaves unread bytes in the socket, the kernel
    answers them with a reset, and the reset can destroy the 413 before the client reads it.
    So the answer goes out with a FIN, and what the client still sends is read and discarded
    (never parsed or held) until it closes or ``linger`` seconds pass. uvicorn has no such
    option, hence this subclass; pass it as ``uvicorn.Config(http=LingeringClose)``.
    """

    linger = 2.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # type: ignore[attr-defined]
            super().data_received(data)

    def body_unread(self) -> bool:
        return self.conn.their_state is h11.SEND_BODY


class _LingeringTransport:
    """The connection's transport, with ``close`` made lingering where the body is unread."""

    def __init__(self, transport: asyncio.Transport, protocol: LingeringClose) -> None:
        self._transport, self._protocol, self.lingering = transport, protocol, False

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        real = self._transport
        if self.lingering or real.is_closing():
            return
        if not (self._protocol.body_unread() and real.can_write_eof()):
            return real.close()
        self.lingering = True
        real.write_eof()  # the answer still buffered goes first, then the FIN
        real.resume_reading()  # read on, discarding, so that no reset is sent
        asyncio.get_running_loop().call_later(self._protocol.linger, real.close)  # the client's EOF closes it sooner


class Disconnect:
    """Watches one request for its client leaving (``left`` is set when it does).

    Start it once the body has been read: from then on, the only message the server can send
    is ``http.disconnect``. :meth:`stop` before handing the connection to a streaming response,
    which watches for itself.
    """

    def __init__(self, request: Request) -> None:
        self.left = asyncio.Event()
        self._task = asyncio.ensure_future(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.left.set()
                return

    def stop(self) -> None:
        self._task.cancel()


class Admission:
    """At most ``active`` generations at once and ``waiting`` requests queued for a slot.

    A slot is released by the generation thread when it ends (not when the response ends),
    so the limit is on real CPU work.
    """

    def __init__(self, active: int, waiting: int, timeout_s: float) -> None:
        self.max_active, self.max_waiting, self.timeout_s = active, waiting, timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self.active = self.waiting = 0

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests start several): start afresh
            self._loop, self._sem = loop, asyncio.Semaphore(self.max_active)
            self.active = self.waiting = 0
        return loop

    async def enter(self, left: asyncio.Event) -> Callable[[], None]:
        """Wait for a slot (unless the client ``left``); returns the thread-safe function that
        gives it back."""
        loop = self._bind()
        if self.active + self.waiting >= self.max_active + self.max_waiting:
            raise APIError(429, "the server is busy (all generation and queue slots are taken); retry shortly",
                           code="overloaded", headers={"Retry-After": "1"})
        sem = self._sem
        self.waiting += 1
        acquire = asyncio.ensure_future(sem.acquire())
        gone = asyncio.ensure_future(left.wait())
        try:
            await asyncio.wait({acquire, gone}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not acquire.done():
                if gone.done():
                    raise APIError(503, "client disconnected while waiting", code="client_gone")
                raise APIError(503, f"no generation slot became free within {self.timeout_s:g} s; retry later",
                               code="queue_timeout", headers={"Retry-After": "5"})
        except BaseException:
            if acquire.done() and not acquire.cancelled():
                sem.release()
            else:
                acquire.cancel()
            raise
        finally:
            gone.cancel()
            self.waiting -= 1
        self.active += 1
        released = False

        def give_back() -> None:
            nonlocal released
            if not released and self._sem is sem:
                released = True
                self.active -= 1
                sem.release()

        def release() -> None:  # called from the generation thread
            try:
                loop.call_soon_threadsafe(give_back)
            except RuntimeError:  # loop closed: nothing left to release
                pass

        return release
