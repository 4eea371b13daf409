"""One inotify instance for every follower of the process.

Linux allows 128 inotify instances per user (``fs.inotify.max_user_instances``):
with one per follower the 129th log stream had none and polled every
``poll_interval``, which for thousands of parked log streams is thousands
of resumes a second.  Here all followers share one instance, and the
followers of one path share one ``Subscriber`` (``logs.source.LogSource``),
whose ``wake()`` the hub's thread calls when one of its watches fires: no
descriptor per follower.  The shared instance is read by the hub's thread
(``hub.Hub.watch_fd``), never by a worker.

inotify gives the same watch descriptor for the same inode within one
instance and replaces its mask unless IN_MASK_ADD is given, so watches are
refcounted per (wd, subscriber), masks only grow, and every event is
filtered by the subscriber's own mask and, for directory events, by the
file name it follows.  IN_IGNORED drops a wd, whose number the kernel may
then reuse: its entry goes and its subscribers are woken; a later
``unwatch`` of the stale wd finds no subscription and does nothing.

Standard library only (ctypes); ``shared()`` is None where there is no
inotify or no hub.
"""

import ctypes
import functools
import logging
import os
import struct
import threading

logger = logging.getLogger("collective.streamguard")

IN_MASK_ADD = 0x20000000
IN_IGNORED = 0x8000
IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")


@functools.cache
def api():
    """(inotify_init1, inotify_add_watch, inotify_rm_watch) from libc, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        init, add, rm = libc.inotify_init1, libc.inotify_add_watch, libc.inotify_rm_watch
    except (OSError, AttributeError):
        return None
    init.argtypes, init.restype = [ctypes.c_int], ctypes.c_int
    add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add.restype = ctypes.c_int
    rm.argtypes, rm.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return init, add, rm


class Subscriber:
    """One path's view of the shared instance: ``wake()`` is called in the
    hub's thread when one of its watches fires."""

    def __init__(self, inotify, name, wake):
        self.inotify = inotify
        #: Directory events wake it only for this file name (bytes).
        self.name = name
        self.wake = wake
        self.masks = {}  # wd -> mask

    def watch(self, path, mask):
        """Add a watch for ``path`` (bytes); its wd, or -1."""
        return self.inotify.watch(self, path, mask)

    def unwatch(self, wd):
        self.inotify.unwatch(self, wd)

    def close(self):
        self.inotify.unsubscribe(self)


class SharedInotify:
    """The process' one inotify instance; its events are read in the hub's
    thread, which starts with the first watch (not before: a log request
    that is refused, or follows nothing, starts no thread)."""

    def __init__(self):
        init, self._add, self._rm = api()
        self.ifd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.ifd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self._watches = {}  # wd -> {subscriber: mask}
        self.hub = None

    def read_in_hub(self):
        """Have the hub's thread read our events (started if need be): at the
        first watch, and again once a hub that read them has stopped."""
        if self.hub is None or not self.hub.alive:
            from collective.streamguard import hub

            self.hub = hub.hub()
            self.hub.watch_fd(self.ifd, self._dispatch)

    def subscribe(self, name, wake):
        """Watches whose events call ``wake()``; directory events only for
        the file ``name`` (bytes; None: all)."""
        return Subscriber(self, name, wake)

    def watch(self, subscriber, path, mask):
        # The add and the table entry under one lock: an event for a new wd
        # is not dispatched before its subscriber is in the table.
        with self.lock:
            self.read_in_hub()
            wd = self._add(self.ifd, path, mask | IN_MASK_ADD)
            if wd < 0:
                return -1
            self._watches.setdefault(wd, {})[subscriber] = mask
            subscriber.masks[wd] = mask
            return wd

    def unwatch(self, subscriber, wd):
        with self.lock:
            subscriber.masks.pop(wd, None)
            subscribers = self._watches.get(wd)
            if subscribers is None or subscribers.pop(subscriber, None) is None:
                return  # IN_IGNORED came first: the number is not ours now
            if not subscribers:
                del self._watches[wd]
                self._rm(self.ifd, wd)

    def unsubscribe(self, subscriber):
        for wd in list(subscriber.masks):
            self.unwatch(subscriber, wd)

    def _dispatch(self):
        # The hub's thread.
        try:
            data = os.read(self.ifd, 65536)
        except BlockingIOError:
            return
        woken = set()
        offset = 0
        with self.lock:
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    for subscribers in self._watches.values():
                        woken.update(subscribers)
                    continue
                subscribers = self._watches.get(wd, {})
                for subscriber, wanted in subscribers.items():
                    if mask & IN_IGNORED or (
                        mask & wanted and (not name or subscriber.name in (None, name))
                    ):
                        woken.add(subscriber)
                if mask & IN_IGNORED:
                    for subscriber in self._watches.pop(wd, {}):
                        subscriber.masks.pop(wd, None)
        for subscriber in woken:
            try:
                subscriber.wake()
            except Exception:
                logger.exception("a watcher of the shared inotify instance failed")


_shared = None
_shared_lock = threading.Lock()


def shared():
    """The process' shared instance (made on first use), or None where
    there is no inotify: followers then poll."""
    global _shared
    from collective.streamguard import hub

    if not hub.SUPPORTED or api() is None:
        return None
    with _shared_lock:
        if _shared is None or _shared.pid != os.getpid():
            try:
                _shared = SharedInotify()
            except OSError:
                logger.warning("no inotify instance: log followers poll their files")
                return None
        elif _shared.hub is not None:
            with _shared.lock:
                _shared.read_in_hub()  # a new hub, if the one that read them stopped
        return _shared
