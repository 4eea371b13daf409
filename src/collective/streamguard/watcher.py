"""One daemon thread that runs on-close callbacks when clients leave.

The thread sleeps in ``epoll`` on the client sockets of all watched
connections (EPOLLRDHUP: the peer's FIN, even behind unread pipelined bytes;
EPOLLHUP/EPOLLERR: reset or gone), and sweeps every ``SWEEP_INTERVAL``
seconds through all of them asking ``state()``.  The sweep catches what epoll
cannot report: a socket the server closed itself (the kernel then drops it
from the epoll set without an event), ZServer channels found by scanning,
and fd numbers reused by a new client.

Started lazily on the first ``watch``; a process forked after that
(gunicorn and uWSGI pre-fork their workers) starts a fresh one.
"""

import logging
import os
import select
import threading
import time

logger = logging.getLogger("collective.streamguard")

SWEEP_INTERVAL = 1.0
_EPOLL_EVENTS = (
    getattr(select, "EPOLLRDHUP", 0)
    | getattr(select, "EPOLLHUP", 0)
    | getattr(select, "EPOLLERR", 0)
)


class WatchHandle:
    """Returned by ``on_close``/``on_disconnect``."""

    __slots__ = ("_entry",)

    def __init__(self, entry):
        self._entry = entry

    def cancel(self):
        """Stop the callback if it has not run yet.  Returns True if this
        call stopped it; False if it already ran or was cancelled before."""
        entry = self._entry
        if entry is None:
            return False
        return entry.watcher._cancel(entry)

    @property
    def fired(self):
        """True once the callback has been called."""
        return self._entry is not None and self._entry.fired


class _Entry:
    __slots__ = ("watcher", "connection", "callback", "fd", "done", "fired")

    def __init__(self, watcher, connection, callback):
        self.watcher = watcher
        self.connection = connection
        self.callback = callback
        self.fd = -1
        self.done = False
        self.fired = False


class Watcher:
    """The watching thread of one process.  Use ``watch()``, not this."""

    def __init__(self, use_epoll=True):
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._pending = []
        self._stopping = False
        # Owned by the watcher thread alone.
        self._entries = set()
        self._by_fd = {}
        #: Sweeps done so far (the watcher's thread counts them).
        self.sweeps = 0
        self._epoll = select.epoll() if use_epoll and hasattr(select, "epoll") else None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(
            target=self._run, name="collective.streamguard watcher", daemon=True
        )
        self._thread.start()

    @property
    def alive(self):
        return self._thread.is_alive() and not self._stopping

    def watch(self, connection, callback):
        entry = _Entry(self, connection, callback)
        with self._lock:
            self._pending.append(entry)
        self._wake()
        return WatchHandle(entry)

    def _wake(self):
        # Under the lock: _close_fds must not close the pipe between our
        # reading its number and writing, or we would write into whatever
        # file got that number next.
        with self._lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # the pipe is full: the thread is awake anyway

    def _cancel(self, entry):
        with self._lock:
            if entry.done:
                return False
            entry.done = True
        # Drop references now; the thread forgets the entry at its next look.
        entry.connection = entry.callback = None
        self._wake()
        return True

    def stop(self, timeout=5.0):
        """Stop the thread; callbacks not yet run never run.  The thread
        closes its fds on its way out (also when a callback calls this)."""
        self._stopping = True
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _close_fds(self):
        # Idempotent: a closed fd number may belong to someone else by now.
        epoll, self._epoll = self._epoll, None
        if epoll is not None:
            epoll.close()
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def _abandon_in_child(self):
        """In a forked child: the thread did not survive the fork, the epoll
        fd refers to the parent's instance (so it must not be used, only
        closed), and the lock may have been held by a parent thread."""
        self._lock = threading.Lock()
        self._stopping = True
        self._close_fds()

    def _run(self):
        try:
            self._loop()
        finally:
            self._close_fds()

    def _loop(self):
        wait = self._epoll.poll if self._epoll is not None else self._select
        if self._epoll is not None:
            self._epoll.register(self._wake_r, select.EPOLLIN)
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while not self._stopping:
            try:
                events = wait(max(0.0, next_sweep - time.monotonic()))
                for fd, _ in events:
                    if fd == self._wake_r:
                        self._drain()
                    else:
                        self._check_fd(fd)
                self._take_pending()
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + SWEEP_INTERVAL
            except Exception:
                # One bad connection object must not end the watching for
                # every other stream in the process.
                logger.exception("watcher loop failed; going on")
                time.sleep(0.1)

    def _select(self, timeout):
        # No epoll (not Linux): sleep on the wake pipe only and let the
        # sweep find closed connections.
        readable, _, _ = select.select([self._wake_r], [], [], timeout)
        return [(fd, 0) for fd in readable]

    def _drain(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _take_pending(self):
        with self._lock:
            pending, self._pending = self._pending, []
        for entry in pending:
            if entry.done:
                continue
            # Already gone when registered (or while we were not looking).
            if not self._settle(entry):
                continue
            self._entries.add(entry)
            connection = entry.connection  # None if cancelled meanwhile
            if self._epoll is None or connection is None:
                continue
            fd = connection.fileno()
            if fd < 0:
                continue
            entry.fd = fd
            self._by_fd.setdefault(fd, set()).add(entry)
            try:
                self._epoll.register(fd, _EPOLL_EVENTS)
            except FileExistsError:
                pass  # another entry watches the same socket
            except OSError:
                pass  # closed just now: the sweep will see it

    def _settle(self, entry):
        """Fire ``entry`` if its client left; True if it is still live."""
        if entry.done:
            self._forget(entry)
            return False
        connection = entry.connection
        if connection is not None and connection.is_open():
            return True
        self._fire(entry)
        self._forget(entry)
        return False

    def _check_fd(self, fd):
        entries = self._by_fd.get(fd, ())
        fired = False
        for entry in list(entries):
            if not self._settle(entry):
                fired = True
        if not fired or not self._by_fd.get(fd):
            # Nobody left to tell, or an event that no connection confirms
            # (the fd is somebody else's by now): stop epoll from repeating
            # it; the sweep still covers the remaining entries.
            self._unregister(fd)

    def _sweep(self):
        for entry in list(self._entries):
            self._settle(entry)
        self.sweeps += 1

    def _forget(self, entry):
        self._entries.discard(entry)
        fd = entry.fd
        if fd >= 0:
            entry.fd = -1
            entries = self._by_fd.get(fd)
            if entries is not None:
                entries.discard(entry)
                if not entries:
                    del self._by_fd[fd]
                    self._unregister(fd)

    def _unregister(self, fd):
        if self._epoll is None:
            return
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed, so the kernel dropped it already
        for entry in self._by_fd.pop(fd, ()):
            entry.fd = -1

    def _fire(self, entry):
        with self._lock:
            if entry.done:
                return
            entry.done = True
        callback, entry.callback, entry.connection = entry.callback, None, None
        entry.fired = True
        try:
            callback()
        except Exception:
            logger.exception("on_close callback %r failed", callback)


_watcher = None
_watcher_lock = threading.Lock()


def watch(connection, callback):
    """Call ``callback()`` once, in the watcher thread, when ``connection``
    reads closed.  Returns a ``WatchHandle``."""
    return _current().watch(connection, callback)


def _current():
    global _watcher
    watcher = _watcher
    if watcher is not None and watcher.pid == os.getpid() and watcher.alive:
        return watcher
    with _watcher_lock:
        watcher = _watcher
        if watcher is None or watcher.pid != os.getpid() or not watcher.alive:
            if watcher is not None and watcher.pid != os.getpid():
                # Forked without our at-fork hook (uWSGI forks from C).
                watcher._abandon_in_child()
            _watcher = watcher = Watcher()
        return watcher


def stop(timeout=5.0):
    """Stop this process' watcher thread (for tests and shutdown).  A later
    ``watch`` starts a new one."""
    global _watcher
    with _watcher_lock:
        watcher, _watcher = _watcher, None
    if watcher is not None and watcher.pid == os.getpid():
        watcher.stop(timeout)


def _after_fork_in_child():
    global _watcher, _watcher_lock
    _watcher_lock = threading.Lock()
    watcher, _watcher = _watcher, None
    if watcher is not None:
        watcher._abandon_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
