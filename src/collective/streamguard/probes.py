"""Server-specific discovery of the client connection behind a request.

Each server lends the application something different: waitress its channel
(through the bound method ``environ['waitress.client_disconnected']``),
gunicorn the socket object, uWSGI an int fd, ZServer its ``zhttp_channel``
(through the response's ``ChannelPipe``) or, with only the environ at hand,
nothing but the channel's creation second and the client address.  The
server modules are never imported here except uWSGI's, lazily, and only when
the environ says the request came from uWSGI.
"""

import errno
import logging
import os
import select
import socket
import sys

from collective.streamguard.connection import CLOSE_EVENTS
from collective.streamguard.connection import ClientConnection
from collective.streamguard.connection import keep_socket_alive
from collective.streamguard.waitress.channel import channel_of

logger = logging.getLogger("collective.streamguard")


#: ``TCP_INFO``'s first byte is the connection's state (Linux'
#: ``tcp_states.h``).  In these the peer has sent neither its FIN nor a
#: reset: ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2 (the last
#: two: only the server's side shut down).  The peer's FIN makes it
#: CLOSE_WAIT, a reset or a timeout CLOSE: what poll() tells as POLLRDHUP,
#: POLLHUP or POLLERR.
TCP_OPEN_STATES = frozenset((1, 2, 3, 4, 5))
TCP_INFO = getattr(socket, "TCP_INFO", None)


def socket_is_open(sock):
    """Exact, O(1): False when the peer has shut down or reset ``sock`` or
    the server has closed it.  Needs a socket object, not an int fd.

    A TCP socket is asked its state (``getsockopt(TCP_INFO)``), anything
    else is polled.  Not a poll() for TCP: poll() lets go of the
    interpreter's lock and getsockopt() does not, and a thread that lets go
    of it while others want it pays a hand-over of about 20 µs of CPU to get
    it back (measured with four workers opening streams at once, as after a
    restart; bench_arrivals.py).  A stream's step asks once."""
    try:
        fd = sock.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if fd < 0:
        return False
    if TCP_INFO is not None and isinstance(sock, socket.socket):
        try:
            # The socket object's own descriptor, and the lock is kept: the
            # server cannot close it and hand the number on meanwhile.
            return sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 1)[0] in TCP_OPEN_STATES
        except OSError as error:
            if error.errno == errno.EBADF:
                return False
            # Not TCP (a Unix socket: EOPNOTSUPP): poll it.
    poller = select.poll()
    poller.register(fd, CLOSE_EVENTS)
    if poller.poll(0):
        # POLLRDHUP/POLLHUP/POLLERR, or POLLNVAL for an fd closed just now.
        return False
    # The server may have closed the socket while we polled, and the kernel
    # handed its fd number to a new client: then we polled the wrong socket.
    try:
        return sock.fileno() == fd
    except (OSError, ValueError):
        return False


class SocketConnection(ClientConnection):
    """A connection whose server lends us the client socket object
    (gunicorn's ``environ['gunicorn.socket']``, sync and gthread workers).

    ``multiplexed`` is for HTTP/2, where the socket carries many requests:
    a closed socket still means gone, but an open one says nothing about
    this request's stream, so it reads UNKNOWN.
    """

    def __init__(self, sock, probe, multiplexed=False):
        super().__init__(probe)
        self._sock = sock
        self._alive = self._unknown if multiplexed else self._open

    def fileno(self):
        try:
            return self._sock.fileno()
        except (AttributeError, OSError, ValueError):
            return -1

    def keep_alive(self, sends_every=None):
        # On the server's socket object itself: no duplicate fd to make and
        # close for each stream.
        if self.fileno() < 0:
            return False
        return keep_socket_alive(self._sock, sends_every)

    def _probe(self):
        return self._alive if socket_is_open(self._sock) else self._closed


class WaitressConnection(SocketConnection):
    """waitress: the channel behind ``environ['waitress.client_disconnected']``.

    With the default ``channel_request_lookahead = 0`` waitress does not read
    the socket while a request is in flight, so its ``channel.connected``
    never flips for an idle stream: the socket probe is what sees the FIN.
    With lookahead >= 1 waitress' main thread may read the FIN first, clear
    ``connected`` and close the socket itself (``fileno()`` then reads -1),
    which is why both are asked.
    """

    def __init__(self, channel):
        # Capture the socket object now: waitress sets channel.socket to
        # None when it closes the channel.
        super().__init__(getattr(channel, "socket", None), "waitress")
        #: The request's waitress channel, until waitress lets go of it.
        self.channel = channel

    def _probe(self):
        channel = self.channel
        if channel is not None and not channel.connected:
            return self._closed
        return super()._probe()

    def release_channel(self):
        """waitress has let go of the socket (``waitress.park``): it never
        reads, sends on or closes it again, so its channel has nothing more
        to tell, and the socket alone is asked from now on."""
        self.channel = None


class FdConnection(ClientConnection):
    """A connection known only by an int fd (uWSGI's ``connection_fd()``).

    An int cannot tell that its socket was closed and the number reused by
    the next client, so the socket's inode is recorded at capture time and
    compared on every call: a new connection on the same fd number reads
    CLOSED for the old request, never OPEN.
    """

    def __init__(self, fd, probe):
        super().__init__(probe)
        self._fd = fd
        try:
            self._identity = self._inode(fd)
        except OSError:
            self._identity = None

    @staticmethod
    def _inode(fd):
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino)

    def _same_socket(self):
        try:
            return self._identity is not None and self._inode(self._fd) == self._identity
        except OSError:
            return False

    def fileno(self):
        return self._fd if self._same_socket() else -1

    def _probe(self):
        if not self._same_socket():
            return self._closed
        poller = select.poll()
        poller.register(self._fd, CLOSE_EVENTS)
        if poller.poll(0) or not self._same_socket():
            return self._closed
        return self._open


class ZServerChannelConnection(SocketConnection):
    """Classic ZServer, exact: the request's own ``zhttp_channel``.

    ZServer's asyncore thread closes the channel when it reads the FIN:
    ``closed`` becomes 1 and the channel leaves ``asyncore.socket_map``.
    Both are asked, then the socket itself, which also sees a FIN the
    asyncore thread has not read yet.
    """

    def __init__(self, channel, probe="zserver-channel"):
        super().__init__(getattr(channel, "socket", None), probe)
        self._channel = channel
        # asyncore dispatchers keep the map they are registered in; ZServer
        # uses the global socket_map.  getattr: dispatchers delegate unknown
        # attributes to their socket, which raises AttributeError.
        self._map = getattr(channel, "_map", None)

    def _probe(self):
        channel = self._channel
        if channel.closed or self._map is None:
            return self._closed
        # _fileno is None once asyncore's del_channel ran: get(None) misses.
        if self._map.get(channel._fileno) is not channel:
            return self._closed
        return super()._probe()


_warned_ambiguous = False


class ZServerScanConnection(ClientConnection):
    """Classic ZServer when only the environ is at hand: a scan of ``socket_map``.

    ``channel.creation_time`` is the int second the TCP connection was made
    and the environ has no client port, so channels are matched on that
    second and ``REMOTE_ADDR``, once, when the connection object is made
    (``client_connection``: ask it in the view).  What that first look
    finds decides for good:

    - no match: CLOSED;
    - one match: that is the request's channel; the connection pins it and
      is exact and O(1) from then on;
    - several (connections from one address opened in the same second):
      the request's channel is one of them and nothing tells which, so the
      connection reads OPEN, conservatively, while any of them is open,
      and CLOSED once all are gone, with a warning once per process.  It
      never pins one of them, not even the last one left (that may be
      another client's), and a channel opened after the first look never
      counts.

    A client that left before the first look while another connection from
    its address, opened in the same second, is still there, makes the
    first look find that one: pass the request, not its environ, to be
    exact whatever happens (``response.stdout._channel``).
    """

    probe = "zserver-scan"

    def __init__(self, socket_map, creation_time, remote_addr):
        super().__init__()
        self._candidates = [
            ZServerChannelConnection(channel, self.probe)
            for channel in self._matches(socket_map, creation_time, remote_addr)
        ]
        self._pinned = self._candidates[0] if len(self._candidates) == 1 else None
        if len(self._candidates) > 1:
            _warn_ambiguous(len(self._candidates))

    @staticmethod
    def _matches(socket_map, creation_time, remote_addr):
        # A list() copy: the asyncore thread mutates the dict meanwhile.
        return [
            channel
            for channel in list(socket_map.values())
            if type(channel).__name__ == "zhttp_channel"
            and getattr(channel, "creation_time", None) == creation_time
            and (getattr(channel, "addr", None) or (None,))[0] == remote_addr
        ]

    def fileno(self):
        return -1 if self._pinned is None else self._pinned.fileno()

    def _probe(self):
        if self._pinned is not None:
            return self._open if self._pinned.is_open() else self._closed
        # No match, or several: open while one of them may be ours.
        if any([candidate.is_open() for candidate in self._candidates]):
            return self._open
        return self._closed


def _warn_ambiguous(count):
    global _warned_ambiguous
    if not _warned_ambiguous:
        _warned_ambiguous = True
        logger.warning(
            "%d ZServer channels from one address were opened in the same "
            "second; cannot tell which one a request belongs to, so its "
            "connection counts as open until all of them are gone.  Pass the "
            "request, not its environ, to see its own channel.  (Logged once.)",
            count,
        )


class UnknownConnection(ClientConnection):
    """No probe for this server (or the in-process test browser): UNKNOWN,
    treated as open.  ``on_close`` never fires; ``wait_closed`` sleeps."""

    def __init__(self, probe="none"):
        super().__init__(probe)

    def _probe(self):
        return self._unknown

    def on_close(self, callback):
        from collective.streamguard.watcher import WatchHandle

        return WatchHandle(None)


def _zserver_channel(pipe):
    channel = getattr(pipe, "_channel", None)
    # ChannelPipe._channel is None once the response finished; a Zope 4+
    # WSGI response's stdout is a BytesIO and has no _channel at all.
    if channel is not None and hasattr(channel, "closed") and hasattr(channel, "_fileno"):
        return channel
    return None


def _request_channel(request):
    response = getattr(request, "response", None)
    return _zserver_channel(getattr(response, "stdout", None))


def _uwsgi():
    try:
        import uwsgi
    except ImportError:
        return UnknownConnection()
    # Only valid in the request's own thread: uWSGI keeps the current
    # request per core (thread).
    return FdConnection(uwsgi.connection_fd(), "uwsgi")


def _zserver_scan(environ):
    creation_time = environ["channel.creation_time"]
    if not isinstance(creation_time, int):
        # A clock-server request: a fake channel with a float creation_time
        # that is never in socket_map.  Nothing to scan for.
        return UnknownConnection("zserver-clock")
    # Not imported: a process with a ZServer in it has imported asyncore
    # already, and asyncore is deprecated (gone in Python 3.12).
    asyncore = sys.modules.get("asyncore")
    if asyncore is None:
        return UnknownConnection()
    return ZServerScanConnection(asyncore.socket_map, creation_time, environ.get("REMOTE_ADDR"))


def discover(environ, request=None):
    """Return the best ``ClientConnection`` the server lets us build for
    this request.  Never raises: anything unrecognised is UNKNOWN."""
    try:
        channel = _request_channel(request) if request is not None else None
        if channel is None:
            # ZServer's WSGI handler puts the ChannelPipe in the environ too.
            channel = _zserver_channel(environ.get("wsgi.output"))
        if channel is not None:
            return ZServerChannelConnection(channel)
        channel = channel_of(environ)
        if channel is not None:
            return WaitressConnection(channel)
        if "gunicorn.socket" in environ:
            multiplexed = str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/2")
            return SocketConnection(environ["gunicorn.socket"], "gunicorn", multiplexed)
        if "uwsgi.version" in environ or "uwsgi.node" in environ:
            return _uwsgi()
        if "channel.creation_time" in environ:
            return _zserver_scan(environ)
    except Exception:
        logger.warning("cannot probe this request's connection", exc_info=True)
    return UnknownConnection()
