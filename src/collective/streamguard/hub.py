"""The hub: one thread per process that watches file descriptors and timers.

A reactor in the manner of Twisted's: it knows descriptors, events and
timers, never what they belong to.  What it watches:

- sockets registered with ``register(fd, handler)``: edge-triggered
  EPOLLRDHUP/HUP/ERR (the peer left) and EPOLLOUT (it takes more), passed
  to ``handler.on_socket_event(mask)``.  EPOLLIN is never asked for:
  pipelined request bytes must not wake anybody;
- readable descriptors armed with ``arm(fds, handler)``, once each
  (EPOLLONESHOT): ``handler.on_readable()``;
- descriptors of its own callers (``watch_fd(fd, callback)``, the shared
  inotify instance), level-triggered: ``callback()``;
- timers (``call_at(when, function, *args)``), served in batches;
- calls from other threads (``call_soon(function, *args)``), through one
  eventfd.

Every handler and callback runs in the hub's thread and must not block.
Parked streams (``collective.streamguard.parking``) are its main handlers.

Plain Python: imports nothing from Zope or waitress.  Linux only (epoll,
eventfd): elsewhere ``SUPPORTED`` is False, and nothing parks.
"""

import collections
import heapq
import itertools
import logging
import os
import select
import threading
import time

logger = logging.getLogger("collective.streamguard")

SUPPORTED = hasattr(select, "epoll") and hasattr(os, "eventfd")

#: The longest epoll wait.
TICK = 1.0
#: How late a timer may fire, so that timers are served in batches: 10,000
#: streams beating every 15 s would otherwise wake the hub 667 times a
#: second for one heartbeat each; with it, about 20 times for a batch each.
TIMER_SLACK = 0.05

#: What a registered socket is watched for (``register``).
SOCKET_EVENTS = (
    select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR | select.EPOLLOUT | select.EPOLLET
    if SUPPORTED
    else 0
)
_READABLE_EVENTS = select.EPOLLIN | select.EPOLLONESHOT if SUPPORTED else 0


class Hub:
    """The one thread that watches descriptors and timers for this process."""

    def __init__(self):
        self.pid = os.getpid()
        self.epoll = select.epoll()
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.eventfd, select.EPOLLIN)
        self.inbox = collections.deque()
        self.handlers = {}  # registered fd -> handler (hub thread only)
        self._timers = []
        self._seq = itertools.count()
        self._readables = {}  # armed fd -> set of handlers
        self._callbacks = {}  # fd -> callback, see watch_fd()
        self._fd_lock = threading.Lock()
        self._signalled = False
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="streamguard-hub", daemon=True)
        self.thread.start()

    # -- any thread ---------------------------------------------------------

    @property
    def alive(self):
        """True while the hub's thread runs, in this process."""
        return self.pid == os.getpid() and self.thread.is_alive() and not self._stopping

    def call_soon(self, function, *args):
        """Run ``function(*args)`` in the hub's thread, soon."""
        self.inbox.append((function, args))
        if not self._signalled:
            self._signalled = True
            try:
                os.eventfd_write(self.eventfd, 1)
            except OSError:
                pass

    def call_at(self, when, function, *args):
        """Run ``function(*args)`` in the hub's thread at ``when``
        (``time.monotonic()``), or up to ``TIMER_SLACK`` later."""
        if threading.current_thread() is self.thread:
            heapq.heappush(self._timers, (when, next(self._seq), function, args))
        else:
            self.call_soon(self.call_at, when, function, *args)

    def arm(self, fds, handler):
        """Call ``handler.on_readable()`` once when one of ``fds`` is readable."""
        with self._fd_lock:
            for fd in fds:
                watchers = self._readables.setdefault(fd, set())
                watchers.add(handler)
                try:
                    try:
                        self.epoll.modify(fd, _READABLE_EVENTS)
                    except FileNotFoundError:
                        self.epoll.register(fd, _READABLE_EVENTS)
                except OSError:
                    # Closed under us: the caller's timeout is the safety net.
                    logger.debug("cannot watch fd %d of %r", fd, handler, exc_info=True)

    def disarm(self, fds, handler):
        """Stop watching ``fds`` for ``handler`` (before their owner closes them)."""
        with self._fd_lock:
            for fd in fds:
                watchers = self._readables.get(fd)
                if watchers is None:
                    continue
                watchers.discard(handler)
                if not watchers:
                    del self._readables[fd]
                    try:
                        self.epoll.unregister(fd)
                    except OSError:
                        pass

    def watch_fd(self, fd, callback):
        """Call ``callback()`` in the hub's thread whenever ``fd`` is
        readable (level-triggered: it must read what is there)."""
        self._callbacks[fd] = callback
        self.epoll.register(fd, select.EPOLLIN)

    def in_thread(self):
        """True in the hub's own thread."""
        return threading.get_ident() == self.thread.ident

    def count(self):
        """How many sockets are registered (parked streams)."""
        return len(self.handlers)

    def pending_timers(self):
        """How many timer entries wait (benchmarks: one per parked stream at most)."""
        return len(self._timers)

    def stop(self, timeout=5.0):
        """End the hub's thread; its handlers are closed."""
        self._stopping = True
        self.call_soon(self._stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # -- the hub's thread ---------------------------------------------------

    def register(self, fd, handler):
        """Watch socket ``fd`` for ``handler.on_socket_event(mask)`` (hub
        thread); False when it cannot be watched."""
        try:
            self.epoll.register(fd, SOCKET_EVENTS)
        except OSError:
            logger.exception("cannot watch the socket of %r", handler)
            return False
        self.handlers[fd] = handler
        return True

    def unregister(self, fd, handler):
        """Stop watching socket ``fd`` (hub thread), before it is closed:
        its number may belong to another socket afterwards."""
        if self.handlers.get(fd) is handler:
            del self.handlers[fd]
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def _stop(self):
        self._stopping = True

    def _run(self):
        try:
            while not self._stopping:
                self._loop_once()
        except Exception:
            logger.exception("the stream hub failed; what it watched is closed")
        finally:
            for handler in list(self.handlers.values()):
                try:
                    handler.close()
                except Exception:
                    logger.exception("closing %r failed", handler)
            self.epoll.close()
            os.close(self.eventfd)

    def _loop_once(self):
        timeout = TICK
        if self._timers:
            due = self._timers[0][0] - time.monotonic()
            timeout = min(TICK, max(due, TIMER_SLACK))
        try:
            events = self.epoll.poll(timeout)
        except InterruptedError:
            events = ()
        for fd, mask in events:
            if fd == self.eventfd:
                try:
                    os.eventfd_read(self.eventfd)
                except BlockingIOError:
                    pass
                # Only now, after the read: the read lets the GIL go, and a
                # call_soon() in that moment that saw the flag down would
                # raise it and write, its write consumed by this read; the
                # flag would then stay up with nothing to read, no later
                # call_soon() would write, and each would wait for the
                # epoll timeout (TICK): 1 s stalls, seen in the tests.  The
                # inbox is drained after this, so a caller that saw the
                # flag up is served in this turn.
                self._signalled = False
                continue
            handler = self.handlers.get(fd)
            if handler is not None:
                handler.on_socket_event(mask)
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
            for handler in watchers:
                handler.on_readable()
        while self.inbox:
            function, args = self.inbox.popleft()
            function(*args)
        self._run_timers()

    def _run_timers(self):
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _when, _seq, function, args = heapq.heappop(timers)
            function(*args)


_hub = None
_hub_lock = threading.Lock()


def hub():
    """The hub of this process, started on first use (again after a fork)."""
    global _hub
    current = _hub
    if current is not None and current.alive:
        return current
    with _hub_lock:
        if _hub is None or not _hub.alive:
            _hub = Hub()
        return _hub


def stop_hub(timeout=5.0):
    """Stop the hub (tests, interpreter exit); the next use starts a new one."""
    global _hub
    with _hub_lock:
        current, _hub = _hub, None
    if current is not None and current.pid == os.getpid():
        current.stop(timeout)
