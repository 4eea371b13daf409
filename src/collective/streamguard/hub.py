"""Parked streams: one thread per process watches every idle stream at once.

A stream whose producer waits in ``guard.idle()`` need not hold a server
worker thread while it waits.  Once the server has let go of its socket
(``waitress_park``), the stream is *parked* here: the hub thread watches,
with one epoll set, the client socket (EPOLLRDHUP/HUP/ERR: the client left;
EPOLLOUT: it reads again), the producer's readable fds, ``guard.wake()``
(through the hub's one eventfd) and a heap of timers (the idle timeout,
heartbeats, ``max_duration``).  When one fires, the stream is *resumed*: its
next steps run on a server worker (never on the hub) through a small,
bounded number of ``parked.Runner`` tasks in the server's own queue, and
their output goes to the socket from a per-stream ``OutQueue`` that is sent
without blocking, by the worker when it can and by the hub on EPOLLOUT.
When the producer waits again the stream parks again.

The hub sends heartbeats itself, without resuming the producer: in
``idle()`` a heartbeat is the guard's fixed bytes, which the producer never
sees.  Only the hub closes a parked stream's socket, after it has left the
epoll set, so that no fd number can be reused under it.

Plain Python: imports nothing from Zope or waitress (the server's part,
``close_channel`` and ``add_task``, is handed in).  Linux only (epoll,
eventfd): elsewhere ``SUPPORTED`` is False and nothing parks.
"""

import collections
import heapq
import itertools
import logging
import os
import select
import threading
import time

from collective.streamguard.guard import READY
from collective.streamguard.guard import STOP
from collective.streamguard.guard import TIMEOUT
from collective.streamguard.parked import CLOSED
from collective.streamguard.parked import ENDING
from collective.streamguard.parked import OUT_LOW
from collective.streamguard.parked import PARKED
from collective.streamguard.parked import QUEUED
from collective.streamguard.parked import RUNNING

logger = logging.getLogger("collective.streamguard")

SUPPORTED = hasattr(select, "epoll") and hasattr(os, "eventfd")

#: How long an ended stream may take to send its last bytes before the
#: hub closes the socket anyway.
LINGER = 10.0
#: The longest epoll wait: also how often stale state is looked at.
TICK = 1.0
#: How late a timer (heartbeat, idle timeout, max_duration) may fire, so
#: that the hub serves timers in batches.
TIMER_SLACK = 0.05

# Socket events: the client left (RDHUP, HUP, ERR) or it can take more (OUT).
# Edge-triggered: EPOLLOUT is reported only after a send() found the buffer
# full, and EPOLLIN is never asked for (pipelined bytes must not wake us).
_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR if SUPPORTED else 0
_SOCKET_EVENTS = _GONE | select.EPOLLOUT | select.EPOLLET if SUPPORTED else 0
_READABLE_EVENTS = select.EPOLLIN | select.EPOLLONESHOT if SUPPORTED else 0


class Hub:
    """The one thread that watches every parked stream of this process."""

    def __init__(self):
        self.pid = os.getpid()
        self.epoll = select.epoll()
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.eventfd, select.EPOLLIN)
        self.inbox = collections.deque()
        self.streams = {}  # socket fd -> ParkedStream (hub thread only)
        self._timers = []
        self._seq = itertools.count()
        self._readables = {}  # producer fd -> set of ParkedStream
        self._callbacks = {}  # fd -> callback, see watch_fd()
        self._fd_lock = threading.Lock()
        self._signalled = False
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="streamguard-hub", daemon=True)
        self.thread.start()

    # -- any thread ---------------------------------------------------------

    def post(self, what, stream, detail):
        self.inbox.append((what, stream, detail))
        if not self._signalled:
            self._signalled = True
            try:
                os.eventfd_write(self.eventfd, 1)
            except OSError:
                pass

    def adopt(self, stream, leftovers=()):
        """Take over a stream whose socket the server let go of."""
        for buffer in leftovers:
            stream.out.add_buffer(buffer)
        self.post("adopt", stream, 0)

    def arm(self, stream, readable):
        """Watch ``readable`` for ``stream`` (its lock held)."""
        fds = [fd for fd in readable if isinstance(fd, int) and fd >= 0]
        stream.armed = fds
        if not fds:
            return
        with self._fd_lock:
            for fd in fds:
                watchers = self._readables.setdefault(fd, set())
                watchers.add(stream)
                try:
                    try:
                        self.epoll.modify(fd, _READABLE_EVENTS)
                    except FileNotFoundError:
                        self.epoll.register(fd, _READABLE_EVENTS)
                except OSError:
                    # Closed under us: the idle timeout is the safety net.
                    logger.debug("cannot watch fd %d of %r", fd, stream, exc_info=True)

    def disarm(self, stream):
        """Stop watching the stream's readable fds (its lock held): done
        before the producer runs, so it may close them."""
        fds, stream.armed = stream.armed, ()
        if not fds:
            return
        with self._fd_lock:
            for fd in fds:
                watchers = self._readables.get(fd)
                if watchers is None:
                    continue
                watchers.discard(stream)
                if not watchers:
                    del self._readables[fd]
                    try:
                        self.epoll.unregister(fd)
                    except OSError:
                        pass

    def watch_fd(self, fd, callback):
        """Call ``callback()`` in the hub's thread whenever ``fd`` is
        readable (level-triggered: it must read what is there); for the
        process' shared inotify instance (``collective.streamguard.inotify``)."""
        self._callbacks[fd] = callback
        self.epoll.register(fd, select.EPOLLIN)

    def count(self):
        return len(self.streams)

    def stop(self, timeout=5.0):
        """End the hub's thread; close what it still holds."""
        self._stopping = True
        self.post("stop", None, 0)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # -- the hub thread -----------------------------------------------------

    def _run(self):
        try:
            while not self._stopping:
                self._loop_once()
        except Exception:
            logger.exception("the stream hub failed; parked streams are closed")
        finally:
            for stream in list(self.streams.values()):
                self._close(stream)
            self.epoll.close()
            os.close(self.eventfd)

    def _loop_once(self):
        timeout = TICK
        if self._timers:
            # Timers wait for at least TIMER_SLACK: 10,000 streams beating
            # every 15 s would wake the hub 667 times a second for one
            # heartbeat each; now about 20 times, for a batch each.
            due = self._timers[0][0] - time.monotonic()
            timeout = min(TICK, max(due, TIMER_SLACK))
        try:
            events = self.epoll.poll(timeout)
        except InterruptedError:
            events = ()
        for fd, mask in events:
            if fd == self.eventfd:
                self._signalled = False
                try:
                    os.eventfd_read(self.eventfd)
                except BlockingIOError:
                    pass
                continue
            stream = self.streams.get(fd)
            if stream is not None:
                self._socket_event(stream, mask)
                continue
            callback = self._callbacks.get(fd)
            if callback is not None:
                try:
                    callback()
                except Exception:
                    logger.exception("a callback of the stream hub failed")
                continue
            with self._fd_lock:
                watchers = list(self._readables.get(fd, ()))
            for stream in watchers:
                stream.resume(READY)
        while self.inbox:
            what, stream, detail = self.inbox.popleft()
            getattr(self, "_on_" + what)(stream, detail)
        self._run_timers()

    def _socket_event(self, stream, mask):
        if mask & (select.EPOLLHUP | select.EPOLLERR):
            # Reset, or both sides shut: nothing more can be sent.
            stream.gone = stream.broken = True
            self._unregister(stream)
            if stream.state is ENDING:
                self._close(stream)
            else:
                stream.resume(STOP, gone=True)
            return
        if mask & select.EPOLLRDHUP:
            # The client shut its side (a FIN, or a half close that still
            # reads): the stream ends, what is queued still goes out.
            stream.gone = True
            stream.resume(STOP, gone=True)
        if mask & select.EPOLLOUT or stream.state is ENDING:
            self._send(stream)

    def _send(self, stream):
        with stream.lock:
            try:
                empty = stream.out.send(stream.sock)
            except OSError:
                stream.gone = stream.broken = True
                empty = False
            state, size = stream.state, stream.out.size
        if state is ENDING and (empty or stream.broken):
            self._close(stream)
        elif stream.gone:
            stream.resume(STOP, gone=True)
        elif state is PARKED and not stream.in_idle and size <= OUT_LOW:
            stream.resume(None)  # the client reads again: go on producing

    def _on_stop(self, stream, detail):
        self._stopping = True

    def _on_adopt(self, stream, detail):
        try:
            self.epoll.register(stream.fd, _SOCKET_EVENTS)
            stream.registered = True
        except OSError:
            logger.exception("cannot watch the socket of %r", stream)
            stream.gone = True
        self.streams[stream.fd] = stream
        with stream.lock:
            stream.state = RUNNING  # what _park_again expects (was ADOPTING)
        # Parked as the producer asked, unless something happened meanwhile
        # (the leftovers of the server go out first, EPOLLOUT if they wait).
        if not stream.gone and stream._park_again():
            if stream.guard.live_streams.shutting_down.is_set():
                stream.resume(STOP)
            return
        with stream.lock:
            stream.outcome = STOP if stream.gone else READY
            stream.in_idle = True
            stream.state = QUEUED
        stream.scheduler.submit(stream)

    def _on_timer(self, stream, due):
        heapq.heappush(self._timers, (due, next(self._seq), stream, due))

    def _run_timers(self):
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _when, _seq, stream, due = heapq.heappop(timers)
            if due == _LINGER:
                if stream.state is ENDING:
                    self._close(stream)  # the client will not read its last bytes
                continue
            with stream.lock:
                if stream.timer_due != due:
                    continue  # an earlier entry replaced this one
                stream.timer_due = None
                if stream.state is not PARKED:
                    continue  # it asks again when it parks
            guard = stream.guard
            if guard.max_duration and now >= guard.started + guard.max_duration:
                stream.resume(STOP)
                continue
            if stream.in_idle and guard.park_deadline is not None and now >= guard.park_deadline:
                stream.resume(TIMEOUT)
                continue
            if stream.in_idle and guard.heartbeat is not None:
                if now >= guard.last_output + guard.heartbeat_interval:
                    self._heartbeat(stream, now)
            with stream.lock:
                if stream.state is PARKED:
                    stream._want_timer(self._on_timer)

    def _heartbeat(self, stream, now):
        guard = stream.guard
        with stream.lock:
            if stream.state is not PARKED or stream.out.size:
                return  # output is pending anyway
            # Sent at once, without the queue: one send() of the shared
            # frame (thousands of streams beat every 15 s); what the socket
            # does not take waits in the queue for EPOLLOUT.
            framed = stream.framed(guard.heartbeat)
            try:
                sent = stream.sock.send(framed)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                stream.gone = stream.broken = True
                sent = len(framed)
            if sent < len(framed):
                stream.out.add(memoryview(framed)[sent:])
        guard.last_output = now
        stream.body.record.bytes_sent += len(guard.heartbeat)
        if stream.gone:
            stream.resume(STOP, gone=True)

    def _unregister(self, stream):
        # Only while registered: the number may belong to another socket
        # once ours is closed.
        if stream.registered:
            stream.registered = False
            try:
                self.epoll.unregister(stream.fd)
            except OSError:
                pass

    def _on_close(self, stream, detail):
        if stream.state is CLOSED:
            return
        if stream.broken or not stream.out.size:
            self._close(stream)
            return
        # Let the last bytes go out (EPOLLOUT), for LINGER at most.
        stream.linger_until = time.monotonic() + LINGER
        self._send(stream)
        if stream.state is not CLOSED:
            heapq.heappush(self._timers, (stream.linger_until, next(self._seq), stream, _LINGER))

    def _close(self, stream):
        if stream.state is CLOSED:
            return
        with stream.lock:
            stream.state = CLOSED
            stream.out.close()
            self.disarm(stream)
        if self.streams.get(stream.fd) is stream:
            del self.streams[stream.fd]
        self._unregister(stream)
        try:
            if stream.close_channel is not None:
                stream.close_channel()
        except Exception:
            logger.exception("closing the connection of %r failed", stream)
        if stream.state is not ENDING:
            # A stream the hub gives up on (stop()): its body ends too.
            stream.guard.parked = None


#: The due of a timer entry that closes an ended stream after LINGER.
_LINGER = -1


_hub = None
_hub_lock = threading.Lock()


def hub():
    """The hub of this process, started on first use (again after a fork)."""
    global _hub
    current = _hub
    if current is not None and current.pid == os.getpid() and current.thread.is_alive():
        return current
    with _hub_lock:
        if _hub is None or _hub.pid != os.getpid() or not _hub.thread.is_alive():
            _hub = Hub()
        return _hub


def stop_hub(timeout=5.0):
    """Stop the hub (tests, interpreter exit); the next use starts a new one."""
    global _hub
    with _hub_lock:
        current, _hub = _hub, None
    if current is not None and current.pid == os.getpid():
        current.stop(timeout)
