"""What the tests share: two HTTP clients, waits, and test bases.

``http_request`` makes one plain request and returns the complete answer;
``HTTPClient`` is the only way a test reads a stream: bytes that arrive
together with the ones a test waits for (the first body bytes with the
headers, the terminating chunk with the last line) stay in its buffer for
the next read instead of being dropped.  Every read waits for what it needs
(a marker, the end of the headers, the terminating chunk, the close) with a
deadline, never for a fixed time.
"""

import base64
import errno
import fcntl
import http.client
import inspect
import logging
import os
import re
import socket
import struct
import sys
import termios
import time
import unittest
import urllib.parse

HOST = "127.0.0.1"
#: The end line GuardedStream logs for every stream.
ENDED = re.compile(r"stream (\d+) ended \((.+)\): (\d+) bytes \((\d+) queued without a copy\)")


def wait_for(predicate, timeout=10.0, interval=0.01):
    """Wait until ``predicate()`` is true; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def basic_auth(user, password):
    """The value of an ``Authorization`` header for HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def http_request(address, path, method="GET", auth=None, headers=None, body=None, timeout=30.0):
    """(status, {lower-case name: value}, body) of one complete request.

    ``address``: (host, port); ``auth``: (user, password) for basic auth;
    ``body``: bytes or str to send.  For answers that end; a stream is read
    with ``HTTPClient``.
    """
    headers = dict(headers or {})
    if auth is not None:
        headers["Authorization"] = basic_auth(*auth)
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        return (
            response.status,
            {name.lower(): value for name, value in response.getheaders()},
            data,
        )
    finally:
        connection.close()


def sweeps_later(watcher, count=2, timeout=10.0):
    """Wait until ``watcher`` (a ``watcher.Watcher``) swept ``count`` more
    times; False if it did not within ``timeout``.

    The positive proof of time passing for a test that asserts something
    does not happen: every sweep asks every watched connection again.  Two,
    because the sweep running now may have begun before what the test did.
    """
    sweeps = watcher.sweeps
    return wait_for(lambda: watcher.sweeps >= sweeps + count, timeout)


def blocked_at(thread, function, call):
    """True while ``thread`` is at the line of ``function`` that makes
    ``call`` (for example the poll a waiter blocks in)."""
    lines, first = inspect.getsourcelines(function)
    targets = {first + n for n, line in enumerate(lines) if call in line}
    frame = sys._current_frames().get(thread.ident)
    return frame is not None and frame.f_code is function.__code__ and frame.f_lineno in targets


def delivered(sock):
    """True once the peer's kernel has every byte sent on ``sock``: its
    send queue (Linux' SIOCOUTQ: unsent and unacknowledged bytes) is empty."""
    queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", queued)[0] == 0


class HTTPClient:
    """A raw HTTP/1.x client over a real socket, with a read buffer.

    ``read_until(marker)`` returns the bytes up to and including ``marker``
    and keeps what came after it; ``head()`` the status line and headers;
    ``body()`` the rest of the response, dechunked; ``closed()`` tells
    whether the server closed the connection.  Anything else (``sendall``,
    ``shutdown``, ``setsockopt``, ...) goes to the socket.
    """

    def __init__(self, address, timeout=10.0, source=None):
        """``source``: the local address to connect from (any 127.x.y.z on
        loopback), for tests of per-address limits."""
        source_address = None if source is None else (source, 0)
        self.sock = socket.create_connection(
            address, timeout=timeout, source_address=source_address
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        #: Every byte received, for ``body()``.
        self.transcript = bytearray()
        self.eof = False
        self.status = None
        self.headers = None

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.sock.close()

    def request(self, path, method="GET", headers=None, version="1.1", auth=None, form=None):
        """Send one request; ``auth`` is (user, password) for basic auth;
        ``form`` a dict sent as an urlencoded body (a POSTed form)."""
        lines = [f"{method} {path} HTTP/{version}", "Host: localhost"]
        if auth is not None:
            lines.append(f"Authorization: {basic_auth(*auth)}")
        body = b""
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            lines.append("Content-Type: application/x-www-form-urlencoded")
            lines.append(f"Content-Length: {len(body)}")
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self

    def _receive(self, deadline):
        """Read what the socket has into the buffer; False at EOF."""
        if self.eof:
            return False
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            raise
        except OSError as error:
            if error.errno not in (errno.ECONNRESET, errno.EPIPE):
                raise
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        self.transcript += data
        return True

    def read_until(self, marker, timeout=10.0):
        """The bytes up to and including ``marker``; the rest stays buffered."""
        deadline = time.monotonic() + timeout
        while (index := self.buffer.find(marker)) < 0:
            try:
                more = self._receive(deadline)
            except TimeoutError:
                raise AssertionError(
                    f"no {marker!r} within {timeout} s; got {bytes(self.buffer)!r:.2000}"
                ) from None
            if not more:
                raise AssertionError(
                    f"server closed before {marker!r}; got {bytes(self.buffer)!r:.2000}"
                )
        end = index + len(marker)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    def head(self, timeout=10.0):
        """(status, {lower-case name: value}) of the response; reads the head once."""
        if self.status is None:
            if b"\r\n\r\n" in self.transcript and not self.buffer.startswith(b"HTTP/"):
                # body() or read_all() took it out of the buffer already.
                raw = bytes(self.transcript).partition(b"\r\n\r\n")[0].decode("latin-1")
            else:
                raw = self.read_until(b"\r\n\r\n", timeout)[:-4].decode("latin-1")
            status_line, *lines = raw.split("\r\n")
            self.status = int(status_line.split()[1])
            self.headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        return self.status, self.headers

    def read_all(self, timeout=10.0):
        """Everything until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self._receive(deadline):
                    break
            except TimeoutError:
                raise AssertionError(
                    f"the server did not close within {timeout} s; got {bytes(self.buffer)!r:.2000}"
                ) from None
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def body(self, timeout=10.0):
        """The whole body of the response (dechunked), once it is complete.

        Parsed from everything the connection received, whatever earlier
        reads took out of the buffer; a chunked body ends with its
        terminating chunk, any other with the server's close.
        """
        deadline = time.monotonic() + timeout
        while True:
            head, _, rest = bytes(self.transcript).partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *([0-9]+)\r?$", head)
            if _ and length and len(rest) >= int(length.group(1)):
                self.buffer.clear()
                return rest[: int(length.group(1))]
            if _ and b"transfer-encoding: chunked" in head.lower():
                body = _dechunk_complete(rest)
                if body is not None:
                    self.buffer.clear()
                    return body
            try:
                more = self._receive(deadline)
            except TimeoutError:
                raise AssertionError(
                    f"the body did not end within {timeout} s; got {bytes(self.transcript)!r:.2000}"
                ) from None
            if not more:
                if _ and b"transfer-encoding: chunked" not in head.lower():
                    self.buffer.clear()
                    return rest
                raise AssertionError(
                    f"server closed before the body ended; got {bytes(self.transcript)!r:.2000}"
                )

    def read_exactly(self, count, timeout=10.0):
        deadline = time.monotonic() + timeout
        while len(self.buffer) < count:
            try:
                more = self._receive(deadline)
            except TimeoutError:
                raise AssertionError(f"{count} bytes not there within {timeout} s") from None
            if not more:
                raise AssertionError(f"server closed before {count} bytes arrived")
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def closed(self, timeout=10.0):
        """True once the server closed its end (EOF or reset) within ``timeout``;
        what it sent before stays buffered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._receive(deadline):
                    return True
            except TimeoutError:
                return False
        return self.eof

    def reset(self):
        """Close with an RST instead of a FIN."""
        reset(self.sock)

    def close(self):
        self.sock.close()


def _dechunk_complete(rest):
    """The body in chunked ``rest`` if its terminating chunk is there, else None."""
    body = bytearray()
    position = 0
    while True:
        line_end = rest.find(b"\r\n", position)
        if line_end < 0:
            return None
        size = int(rest[position:line_end].split(b";")[0], 16)
        start = line_end + 2
        if len(rest) < start + size + 2:
            return None
        assert rest[start + size : start + size + 2] == b"\r\n", rest[start + size :][:40]
        if size == 0:
            return bytes(body)
        body += rest[start : start + size]
        position = start + size + 2


def dechunk(raw):
    """(head, body) of a whole chunked HTTP/1.1 response, checking its framing."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = bytearray()
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n", rest[:40]
            return head, bytes(body)
        body += rest[:size]
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


def read_until(client, marker, timeout=10.0):
    """``client.read_until(marker)``: for the tests' existing call sites."""
    return client.read_until(marker, timeout)


def reset(sock):
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    sock = getattr(sock, "sock", sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_gone(client, timeout=10.0):
    """Wait until the server closed its end of ``client`` (EOF or reset)."""
    return client.closed(timeout)


class SocketTestCase(unittest.TestCase):
    def setUp(self):
        self.sockets = []

    def tearDown(self):
        for sock in self.sockets:
            sock.close()

    def pair(self):
        """A connected loopback TCP pair: (server side, client side)."""
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
        self.sockets += [server, client]
        return server, client


class AllLogLines(logging.Handler):
    """Every log line of ``logger_name`` (the root: the whole process,
    waitress' too), formatted with its traceback."""

    logger_name = ""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(name)s %(message)s"))
        self.texts = []

    @classmethod
    def attach(cls, testcase):
        handler = cls()
        logger = logging.getLogger(cls.logger_name)
        testcase.addCleanup(logger.setLevel, logger.level)
        testcase.addCleanup(logger.removeHandler, handler)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return handler

    def emit(self, record):
        self.texts.append(self.format(record))


class Recorder(AllLogLines):
    """The "stream N ended" lines of collective.streamguard's log."""

    logger_name = "collective.streamguard"

    def __init__(self):
        super().__init__()
        self.ended = []

    def emit(self, record):
        match = ENDED.match(record.getMessage())
        if match:
            self.ended.append(
                dict(reason=match.group(2), sent=int(match.group(3)), direct=int(match.group(4)))
            )


def open_connections(db):
    """The ZODB connections of ``db`` that are open now."""
    return [info for info in db.connectionDebugInfo() if info["opened"]]


class NotServing(AssertionError):
    """The process exited, or did not serve within its time."""


def wait_until_serving(port, process, timeout=60.0, path="/", ready=None):
    """Wait until ``process`` serves on ``port`` of ``HOST``; raise
    ``NotServing`` if it exits first or does not serve within ``timeout``.

    ``path``: the page to GET; any HTTP answer counts, or the ones for which
    ``ready(status, body)`` is true.  ``path=None``: accepting a TCP
    connection is enough (runzeo speaks no HTTP).
    """

    def serving():
        if process.poll() is not None:
            name = os.path.basename(str(process.args[0]))
            raise NotServing(f"{name} exited with {process.returncode}")
        try:
            if path is None:
                socket.create_connection((HOST, port), timeout=2).close()
                return True
            status, _, body = http_request((HOST, port), path, timeout=2)
        except (OSError, http.client.HTTPException):
            return False  # not listening, or not answering yet
        return ready is None or ready(status, body)

    # Nothing to wait on but the port itself: ask again every 50 ms.
    if not wait_for(serving, timeout, interval=0.05):
        raise NotServing(f"nothing served on port {port} within {timeout} s")
