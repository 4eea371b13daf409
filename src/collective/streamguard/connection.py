"""Is the browser still there?  The plain-Python core of disconnect detection.

A streaming view holds a server thread for as long as it streams.  No WSGI
server tells the application, in a standard way, that the client has gone,
so an abandoned stream holds its thread forever (four abandoned log
streams on a 4-thread waitress, and a Plone site answers nothing).  This module asks
the server's own connection object instead: exactly and in O(1) where the
server lends us the client socket (waitress, gunicorn, uWSGI, ZServer's
channel), by scanning ZServer's ``asyncore.socket_map`` for the request's
``channel.creation_time`` where only the environ is known, and not at all
(UNKNOWN, treated as open) where there is nothing to ask.

This module imports nothing from Zope or Plone.  The server-specific parts
live in ``probes``; on-close callbacks run in ``watcher``'s one thread.
"""

import enum
import functools
import logging
import os
import select
import socket
import time
from dataclasses import dataclass

logger = logging.getLogger("collective.streamguard")

#: The environ key under which ``client_connection`` caches its answer.  The
#: environ is per request and survives Zope's ``request.close()`` (the body
#: iterator runs after it), so a later keep-alive request on the same socket
#: never inherits an earlier request's object.
ENVIRON_KEY = "collective.streamguard.connection"

# POLLRDHUP reports the peer's FIN even when unread pipelined bytes wait in
# front of it, where a one-byte MSG_PEEK only sees those bytes.  It is Linux
# only; elsewhere only POLLHUP/POLLERR (reset, both sides shut) are seen.
# POLLIN is left out on purpose: pipelined bytes must not wake a waiter.
POLLRDHUP = getattr(select, "POLLRDHUP", 0)
CLOSE_EVENTS = POLLRDHUP | select.POLLHUP | select.POLLERR

# A poll() blocked in one thread is not woken when another thread (the
# server's) closes the fd, so waiters wake this often to re-ask the server's
# own flags (waitress' channel.connected, ZServer's channel.closed).
RECHECK_INTERVAL = 0.5


# A peer that vanishes without FIN or reset (a laptop that sleeps, a dropped
# network) is otherwise found only by a write that fails: for a quiet text
# stream never, for server-sent events after the kernel's retransmission
# timeout (about 16 minutes).  With these, the kernel probes an idle
# connection after KEEPALIVE_IDLE s, every KEEPALIVE_INTERVAL s, and gives
# up after KEEPALIVE_COUNT unanswered probes (20 + 3 x 10 = 50 s); data sent
# but not acknowledged for USER_TIMEOUT_MS fails the connection as well
# (Linux' TCP_USER_TIMEOUT).  The socket then reports POLLERR|POLLHUP, which
# wakes a waiting stream at once.
KEEPALIVE_IDLE = 20
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 50_000


#: How long a vanished peer may take to be found, whatever the stream sends.
VANISHED_PEER_BOUND = 50


def user_timeout_ms(sends_every=None):
    """TCP_USER_TIMEOUT for a stream that writes every ``sends_every`` s."""
    if not sends_every:
        return USER_TIMEOUT_MS
    # At least 10 s: a slow client on a bad link must not be taken for gone.
    return max(10_000, int((VANISHED_PEER_BOUND - sends_every) * 1000))


def keep_alive(fd, sends_every=None):
    """Turn on the keepalive probes above on the TCP socket ``fd``; False
    where it is not one (or the system lacks the options).

    ``sends_every``: the stream writes at least this often (seconds: its
    heartbeat).  Then its writes, not keepalive probes, find a vanished
    peer: the first write after the peer vanished comes up to that long
    later, and the user timeout counts from there, so it is shortened to
    keep the whole within VANISHED_PEER_BOUND."""
    if fd < 0:
        return False
    try:
        # A duplicate: closing this object leaves the server's fd alone.
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return keep_socket_alive(sock, sends_every)
    finally:
        sock.close()


def keep_socket_alive(sock, sends_every=None):
    """``keep_alive`` on a socket object (the server's own: the options
    belong to the socket, not to one of its fds)."""
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_INET,
            socket.AF_INET6,
        ):
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
            ("TCP_USER_TIMEOUT", user_timeout_ms(sends_every)),
        ):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        return True
    except (OSError, ValueError):
        return False


class ConnectionState(enum.Enum):
    """What a probe knows about the client's TCP connection."""

    OPEN = "open"
    CLOSED = "closed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Verdict:
    """A probe's answer: the ``state`` and the name of the ``probe`` that
    decided it ("waitress", "gunicorn", "uwsgi", "zserver-channel",
    "zserver-scan", "zserver-clock" or "none").

    ``bool(verdict)`` is False only for CLOSED: a connection nobody can
    see into counts as open, so a loop ``while verdict:`` keeps serving on
    servers we cannot probe rather than stopping at once.
    """

    state: ConnectionState
    probe: str

    def __bool__(self):
        return self.state is not ConnectionState.CLOSED


class ClientConnection:
    """The client connection behind one request.

    Get one with ``client_connection(request_or_environ)``; subclasses in
    ``probes`` implement ``_probe()`` (and ``fileno()`` where there is a
    socket to watch).  Once a probe has seen the connection closed the object
    stays closed: the same fd number may belong to a new client by then.
    All methods may be called from any thread.
    """

    probe = "none"

    def __init__(self, probe=None):
        if probe is not None:
            self.probe = probe
        self._open, self._closed, self._unknown = _verdicts(self.probe)
        self._gone = False

    def __repr__(self):
        return f"<{type(self).__name__} probe={self.probe!r} fd={self.fileno()}>"

    def _probe(self):
        raise NotImplementedError

    def state(self):
        """Return a ``Verdict`` for the connection, now.  Never raises."""
        if self._gone:
            return self._closed
        try:
            verdict = self._probe()
        except Exception:
            # A probe reads another thread's server objects; if they are
            # torn down under us that is a close, not an error for the view.
            logger.debug("probe %s failed; reading closed", self.probe, exc_info=True)
            verdict = self._closed
        if verdict.state is ConnectionState.CLOSED:
            self._gone = True
        return verdict

    def is_open(self):
        """False only when the client is known to have left."""
        return self.state().state is not ConnectionState.CLOSED

    def fileno(self):
        """The client socket's fd, or -1 when there is none (or no more)."""
        return -1

    def keep_alive(self, sends_every=None):
        """Turn on ``connection.keep_alive``'s probes on the client socket;
        False where there is none or it is not TCP."""
        return keep_alive(self.fileno(), sends_every)

    def wait_closed(self, timeout=None):
        """Block until the client leaves or ``timeout`` seconds pass.

        Returns True the moment the client is gone, False on timeout.  With
        UNKNOWN this only sleeps out the timeout (forever for ``None``): pass
        a timeout where the server may be one we cannot probe.
        """
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
        while True:
            if self.state().state is ConnectionState.CLOSED:
                return True
            now = time.monotonic()
            if deadline is None:
                step = RECHECK_INTERVAL
            elif now >= deadline:
                return False
            else:
                step = min(RECHECK_INTERVAL, deadline - now)
            fd = self.fileno()
            if fd < 0:
                time.sleep(step)
                continue
            # A fresh poll object per wait: select.poll objects refuse to be
            # polled from two threads at once (RuntimeError).
            poller = select.poll()
            poller.register(fd, CLOSE_EVENTS)
            if poller.poll(step * 1000.0) and self.is_open():
                # An event the probe does not confirm (the fd now belongs to
                # someone else); do not spin on it.
                time.sleep(min(step, 0.05))

    def on_close(self, callback):
        """Call ``callback()`` once, in the watcher thread, when the client
        leaves.  Returns a handle whose ``cancel()`` stops a callback that has
        not run yet.  Exceptions from the callback are logged, not raised.
        Keep callbacks short: they share one thread with all others.
        """
        from collective.streamguard.watcher import watch

        return watch(self, callback)


@functools.cache
def _verdicts(probe):
    """The three verdicts of a probe, shared by all its connections (they
    are frozen; a parked stream keeps its connection for hours)."""
    states = (ConnectionState.OPEN, ConnectionState.CLOSED, ConnectionState.UNKNOWN)
    return tuple(Verdict(state, probe) for state in states)


def _environ_of(request_or_environ):
    if isinstance(request_or_environ, dict):
        return request_or_environ, None
    environ = getattr(request_or_environ, "environ", None)
    if isinstance(environ, dict):
        return environ, request_or_environ
    raise TypeError(
        "collective.streamguard needs a Zope request or a WSGI environ, "
        f"got {type(request_or_environ).__name__}: {request_or_environ!r:.80}"
    )


def client_connection(request_or_environ):
    """Return the ``ClientConnection`` for a Zope request or a WSGI environ.

    The answer is cached in the environ, so call it as often as you like.
    Capture it in the view and keep it for the body iterator: uWSGI can only
    tell the connection from inside the request's own thread.  No reference
    to the request object is kept.
    """
    environ, request = _environ_of(request_or_environ)
    connection = environ.get(ENVIRON_KEY)
    if connection is None:
        # Imported here: probes imports this module for the base class.
        from collective.streamguard.probes import discover

        connection = environ.setdefault(ENVIRON_KEY, discover(environ, request))
    return connection


def connection_state(request_or_environ):
    """The ``Verdict`` for the request's client connection, now."""
    return client_connection(request_or_environ).state()


def is_browser_connection_open(request_or_environ):
    """False only when the client of this request is known to have left.

    The name is the one Zope developers have long asked for; unlike a scan
    of ZServer's ``socket_map`` this is O(1) on every server that lends us
    the client socket.
    """
    return client_connection(request_or_environ).is_open()


def wait_for_disconnect(request_or_environ, timeout=None):
    """Block until the request's client leaves (True) or timeout (False)."""
    return client_connection(request_or_environ).wait_closed(timeout)


def on_disconnect(request_or_environ, callback):
    """Call ``callback()`` once when the request's client leaves; returns a
    handle with ``cancel()``.  See ``ClientConnection.on_close``."""
    return client_connection(request_or_environ).on_close(callback)
