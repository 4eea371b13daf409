"""Small WSGI apps that the real servers of the tests and benchmarks serve.

They run inside the server process (waitress, gunicorn, uWSGI) and talk to
the test process over unix datagram sockets in a shared temp directory:

- events: the app sends a JSON datagram per event ("start", "waited",
  "callback", "end", "reply") to the socket named by the environment
  variable ``STREAMGUARD_TEST_EVENTS`` (``EventSink``, below, binds it);
- control: the first request starts a thread in the server process that
  listens on ``ctl-<pid>`` next to it, so a test can ask for the probe
  verdict of any request this process has seen, at any moment, even while
  every worker is busy streaming (gunicorn's sync worker has only one).

Every event carries ``t``, ``time.monotonic()`` in the server process, which
on Linux is comparable with the test process' clock.

Paths (``/stream?id=...`` query parameters):

``/ping``
    200 "pong": the server is up and the app importable.
``/hold?id=R``
    captures the request's connection under R and answers at once.
``/stream?id=R&mode=wait|idle|flag|write&timeout=T&callback=1&compare=R0``
    captures the connection under R, reports "start" (its verdict, fd, and
    with ``compare`` the verdict of R0 and whether R0 is the same object),
    sends "ready\\n", then, by mode: ``wait`` loops ``wait_closed(T)``
    reporting each return as "waited" until the client left; ``idle`` sits
    without looking until the test sends "release" (so only a probe the test
    asks for can see the client leave); ``flag`` polls waitress' own
    ``waitress.client_disconnected`` every T seconds; ``write`` writes a
    chunk every T seconds until the server raises on a dead client.  Every
    stream reports "end" from its iterator's ``close()``.
"""

import json
import os
import socket
import threading
import time
import uuid
from urllib.parse import parse_qs

from collective.streamguard import client_connection
from collective.streamguard import watcher
from collective.streamguard.connection import ConnectionState

EVENTS_ENV = "STREAMGUARD_TEST_EVENTS"
STREAM_CAP = 60.0  # no stream outlives a forgotten test by more than this

_connections = {}  # request id -> ClientConnection, for this process' life
_releases = {}  # request id -> threading.Event
_callbacks = {}  # request id -> how often its on_close callback ran
_lock = threading.Lock()
_control = None


_reporter = None  # (pid, socket): one per process, made once


def report(event, **fields):
    global _reporter
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    fields.update(event=event, pid=os.getpid(), t=time.monotonic())
    # One socket for the life of the process, so that reporting takes no new
    # fd: the fd-reuse tests need the server's next accept() to get the
    # number the last closed connection had.
    if _reporter is None or _reporter[0] != os.getpid():
        _reporter = (os.getpid(), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    try:
        _reporter[1].sendto(json.dumps(fields).encode(), path)
    except OSError:
        pass  # the test has gone; nobody to tell


def describe(connection):
    verdict = connection.state()
    return {
        "state": verdict.state.value,
        "probe": verdict.probe,
        "fd": connection.fileno(),
    }


def _control_loop(sock):
    while True:
        try:
            data = sock.recv(65536)
            message = json.loads(data)
        except (OSError, ValueError):
            continue
        rid = message.get("id")
        op = message.get("op")
        reply = {"token": message.get("token"), "id": rid, "op": op}
        with _lock:
            connection = _connections.get(rid)
            release = _releases.get(rid)
            reply["callbacks"] = _callbacks.get(rid, 0)
        if op == "state" and connection is not None:
            reply.update(describe(connection))
            current = watcher._watcher  # None until a callback is watched
            reply["sweeps"] = None if current is None else current.sweeps
        elif op == "release" and release is not None:
            release.set()
        elif op != "ping":
            reply["error"] = f"no request {rid!r} in process {os.getpid()}"
        report("reply", **reply)


def _ensure_control():
    """One control thread per server process (started lazily: gunicorn
    and uWSGI import the app before they fork their workers)."""
    global _control
    events = os.environ.get(EVENTS_ENV)
    with _lock:
        if not events or (_control is not None and _control[0] == os.getpid()):
            return _control[1] if _control else None
        path = os.path.join(os.path.dirname(events), f"ctl-{os.getpid()}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        threading.Thread(target=_control_loop, args=(sock,), daemon=True).start()
        _control = (os.getpid(), path)
        return path


def _query(environ):
    return {key: values[-1] for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()}


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/ping":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        return [b"pong"]
    if path not in ("/hold", "/stream"):
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]
    query = _query(environ)
    rid = query.get("id", "")
    connection = client_connection(environ)
    ctl = _ensure_control()
    start = dict(id=rid, ctl=ctl, path=path, **describe(connection))
    compare = query.get("compare")
    with _lock:
        other = _connections.get(compare)
        _connections[rid] = connection
        _releases[rid] = threading.Event()
    if compare:
        start["compare"] = describe(other) if other is not None else None
        start["same_object"] = other is connection
    if query.get("callback"):
        connection.on_close(lambda: _called_back(rid))
    report("start", **start)
    if path == "/hold":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"held\n"]
    # No Content-Length: an endless body, chunked under HTTP/1.1.
    start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
    return Stream(environ, connection, rid, query)


def _called_back(rid):
    with _lock:
        _callbacks[rid] = count = _callbacks.get(rid, 0) + 1
    report("callback", id=rid, count=count, thread=threading.current_thread().name)


class Stream:
    """The endless body; its ``close()`` is the server's end-of-stream."""

    def __init__(self, environ, connection, rid, query):
        self.connection = connection
        self.rid = rid
        self.mode = query.get("mode", "wait")
        self.timeout = float(query.get("timeout", "30"))
        self.begun = time.monotonic()
        self.flag = environ.get("waitress.client_disconnected")
        self.steps = self._steps()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.steps)

    def _steps(self):
        yield b"ready\n"
        with _lock:
            release = _releases[self.rid]
        if self.mode == "idle":
            release.wait(STREAM_CAP)
        elif self.mode == "wait":
            while time.monotonic() - self.begun < STREAM_CAP:
                started = time.monotonic()
                left = self.connection.wait_closed(self.timeout)
                report(
                    "waited",
                    id=self.rid,
                    left=left,
                    elapsed=time.monotonic() - started,
                    state=self.connection.state().state.value,
                )
                if left or release.is_set():
                    break
        elif self.mode == "flag":
            # waitress' own hook: only flips with channel_request_lookahead >= 1.
            while not self.flag() and time.monotonic() - self.begun < STREAM_CAP:
                time.sleep(self.timeout)
            report("flagged", id=self.rid, flag=self.flag())
        elif self.mode == "write":
            # The naive loop: learns of the disconnect only when a write fails.
            while time.monotonic() - self.begun < STREAM_CAP:
                time.sleep(self.timeout)
                yield b"tick\n"

    def close(self):
        self.steps.close()
        verdict = self.connection.state()
        report(
            "end",
            id=self.rid,
            state=verdict.state.value,
            closed=verdict.state is ConnectionState.CLOSED,
        )


class EventSink:
    """The test end of the side channel: a bound unix datagram socket in
    ``directory``; pass ``env`` to the server (``servers.Server``)."""

    def __init__(self, directory):
        self.path = os.path.join(directory, "events")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.buffer = []

    @property
    def env(self):
        return {EVENTS_ENV: self.path}

    def close(self):
        self.sock.close()

    def _receive(self, timeout):
        self.sock.settimeout(max(timeout, 0.001))
        try:
            self.buffer.append(json.loads(self.sock.recv(65536)))
        except (TimeoutError, BlockingIOError):
            pass

    def _drain(self):
        self.sock.setblocking(False)
        while True:
            try:
                self.buffer.append(json.loads(self.sock.recv(65536)))
            except BlockingIOError:
                return

    def collect(self, **match):
        """All events matching ``match`` that arrived so far, consumed."""
        self._drain()
        found = [e for e in self.buffer if all(e.get(k) == v for k, v in match.items())]
        self.buffer = [e for e in self.buffer if e not in found]
        return found

    def wait_for(self, timeout=10.0, **match):
        """The first event matching ``match``; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.buffer:
                if all(event.get(k) == v for k, v in match.items()):
                    self.buffer.remove(event)
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event {match} within {timeout} s; have {self.buffer}")
            self._receive(left)

    def ask(self, ctl, op, rid, timeout=10.0):
        """Send ``op`` ("state", "release", "ping") about request ``rid`` to
        the server process listening on ``ctl``; return its reply."""
        token = uuid.uuid4().hex
        self.sock.sendto(json.dumps({"op": op, "id": rid, "token": token}).encode(), ctl)
        return self.wait_for(timeout, event="reply", token=token)
