"""One log file's descriptors, watches and answers, shared by its followers.

The followers of one path in a process (``follower.LogFollower``) share a
``LogSource``: the pinned directory (``O_PATH``, opened once, so that the
name is never followed through a symbolic link to another directory), one
descriptor per file open at the name (the current file, and a rotated one
while a follower still reads it), one subscription to the process' shared
inotify instance (``inotify``), and, once per change, their questions to
the file system (the name's identity, a file's size, small reads).

Standard library only.
"""

import errno
import logging
import os
import threading

from collective.streamguard.logs import inotify

logger = logging.getLogger("collective.streamguard")

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# O_PATH: the directory needs search permission only, not read permission.
DIR_FLAGS = os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)

# <sys/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x002, 0x004, 0x008
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x040, 0x080, 0x100, 0x200
IN_ONLYDIR = 0x01000000
# Names coming and going in the directory: rotation, deletion, creation.
# IN_MODIFY is deliberately not watched on the directory: a directory watch
# reports writes to *every* file in it, and Zope's var/log holds the access
# log next to the event log, so each request would wake every follower.
DIR_MASK = IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_ATTRIB
# Writes, truncation and chmod of the file we have open (watched by inode).
FILE_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_ATTRIB


class LogUnavailable(Exception):
    """The configured file cannot be followed (missing directory, not a
    regular file, a symbolic link, unreadable); ``str()`` is a short reason."""


class OpenFile:
    """One file open at (or once at) a followed name: its fd, its identity
    (st_dev, st_ino) and its inotify watch, shared by the followers reading it."""

    __slots__ = ("fd", "ident", "wd", "users", "checked")

    def __init__(self, fd, ident):
        self.fd, self.ident, self.wd, self.users = fd, ident, -1, 0
        #: A follower's checks of what it opened passed for this file.
        self.checked = False


class LogSource:
    """What every follower of one path in this process shares.

    One pinned directory fd, one fd per file open at the name (the current
    file, and a rotated one while a follower still reads it), one
    subscription to the process' inotify instance, and a count of the
    changes inotify reported.  Ten thousand streams of the event log hold
    two descriptors between them, not three each.

    While inotify reports changes, what the followers ask of the file system
    is answered once per change for all of them: the check of the name, the
    size, and small reads (the tail of a fan-out: every follower reads the
    same new line at the same offset).  A follower that read to the end
    asks nothing at all until the count moves.  An answer is as fresh as
    the last event: a write after it makes an event of its own, which moves
    the count and wakes every follower, so nothing is missed.
    """

    _sources = {}  # path -> LogSource, see acquire()
    _sources_lock = threading.Lock()
    #: Small reads kept per change; larger ones (a catch-up) are the
    #: reader's own.
    _CACHED_READS = 16

    def __init__(self, path, key):
        self.path = path
        self.key = key  # in _sources
        self.dir, self.name = os.path.split(path)
        self.users = 0
        self.lock = threading.Lock()
        self.files = {}  # ident -> OpenFile
        #: Told of every change, in the hub's thread: a tuple, replaced
        #: whole, so the hub reads it without the lock.
        self.listeners = ()
        #: Moves at every inotify event (only the hub's thread changes it);
        #: None while nothing reports changes: then every question goes to
        #: the file system.
        self.changes = None
        self._subscriber = None
        self._cache = {}
        self._cache_at = None
        #: Moves whenever the kept answers are forgotten (``forget``): a
        #: read that began before must not ``remember`` what it found.
        self.epoch = 0
        self._forgotten_at = None  # the change count of the last forget()
        self.dfd = None

    @classmethod
    def acquire(cls, path, use_inotify=True):
        """The shared source of ``path`` (opened on first use); raises
        ``LogUnavailable`` when its directory cannot be opened."""
        with cls._sources_lock:
            key = (path, bool(use_inotify), os.getpid())
            source = cls._sources.get(key)
            if source is None:
                source = cls(path, key)
                source._open(use_inotify)
                cls._sources[key] = source
            source.users += 1
            return source

    def release(self):
        with self._sources_lock:
            self.users -= 1
            if self.users > 0:
                return
            if self._sources.get(self.key) is self:
                del self._sources[self.key]
        if self._subscriber is not None:
            self._subscriber.close()
        os.close(self.dfd)

    def _open(self, use_inotify):
        try:
            # Pinned once: a parent directory later swapped for a symbolic
            # link cannot redirect the followers.  A directory that is a
            # symbolic link at configuration time (/var/log) is fine.
            self.dfd = os.open(self.dir, DIR_FLAGS)
        except OSError as error:
            raise LogUnavailable(f"directory {self.dir}: {reason_of(error)}") from None
        shared = inotify.shared() if use_inotify and inotify.api() is not None else None
        if shared is None:
            return  # followers wait their poll_interval
        subscriber = shared.subscribe(os.fsencode(self.name), self._changed)
        if subscriber.watch(os.fsencode(self.dir), DIR_MASK | IN_ONLYDIR) < 0:
            subscriber.close()
            return
        self._subscriber, self.changes = subscriber, 0

    # -- changes (the hub's thread) -------------------------------------------

    def _changed(self):
        # No lock: the hub must not wait for a reader's system call.
        self.changes += 1
        for listener in self.listeners:
            try:
                listener()
            except Exception:
                logger.exception("a listener of %s failed", self.path)

    def listen(self, listener):
        with self.lock:
            self.listeners += (listener,)

    def unlisten(self, listener):
        with self.lock:
            listeners = list(self.listeners)
            if listener in listeners:
                listeners.remove(listener)
                self.listeners = tuple(listeners)

    # -- the file system, once per change ---------------------------------------

    def _cached(self, key, ask, shared):
        """``ask()``'s answer, kept until the next change; ``shared``: an
        answer kept since the last change will do."""
        if not shared or self.changes is None:
            return ask()
        with self.lock:
            changes = self.changes
            if self._cache_at != changes:
                self._cache.clear()
                self._cache_at = changes
            try:
                answer = self._cache[key]
            except KeyError:
                pass
            else:
                if isinstance(answer, OSError):
                    raise answer
                return answer
            try:
                answer = ask()
            except OSError as error:
                answer = error
            # Kept only if no event came meanwhile: the answer may be older.
            if self.changes == changes and (
                key[0] != "read" or len(self._cache) < self._CACHED_READS
            ):
                self._cache[key] = answer
            if isinstance(answer, OSError):
                raise answer
            return answer

    def recall(self, key):
        """What a follower in the state ``key`` read since the last change
        (``remember``), or None."""
        with self.lock:
            if self._cache_at == self.changes:
                return self._cache.get(("result", key))
        return None

    def remember(self, key, result, changes, epoch):
        """Keep what a follower in the state ``key`` read at ``changes``
        (and ``epoch``), for the others in the same state: in a fan-out
        every follower of the path is, and reads the same line.  True if
        it was kept."""
        with self.lock:
            if self.changes != changes or self.epoch != epoch:
                return False  # an event came meanwhile: a later read may differ
            if self._cache_at != changes:
                self._cache.clear()
                self._cache_at = changes
            if len(self._cache) < 4 * self._CACHED_READS:
                self._cache[("result", key)] = result
                return True
            return False

    def forget(self, changes):
        """Drop every answer kept since the last change (``changes``): they
        may be older than something a follower has just seen for itself.
        Once per change: what is kept after it was asked after that look
        (after a copytruncate, every follower of the path sees it, and
        the second one's answer is shared again with the rest)."""
        with self.lock:
            if self._forgotten_at == changes == self.changes:
                return
            self._forgotten_at = changes
            self._drop_kept()

    def _drop_kept(self):
        # Our lock held.
        self._cache.clear()
        self.epoch += 1

    def stat_name(self, shared=False):
        """os.stat of the name (not followed); raises OSError."""
        return self._cached(("name",), self._stat_name, shared)

    def _stat_name(self):
        return os.stat(self.name, dir_fd=self.dfd, follow_symlinks=False)

    def size(self, file, shared=False):
        return self._cached(("size", file.ident), lambda: os.fstat(file.fd).st_size, shared)

    def pread(self, file, count, offset, shared=False):
        key = ("read", file.ident, count, offset)
        return self._cached(key, lambda: os.pread(file.fd, count, offset), shared)

    # -- open files ---------------------------------------------------------

    def open_file(self, seen=None):
        """The file now at the name, shared with the other followers, and
        its ``os.stat_result``; give it back with ``close_file``.  Raises
        OSError (ENOENT: there is none at the name).

        ``seen``: the name's ``os.stat_result`` (not followed), just taken.
        When that file is open here already, it is shared as it is: no
        open(), fstat() and close() for each follower that joins (each
        lets the GIL go: under a burst of a thousand arrivals, a thousand
        hand-overs between busy threads)."""
        if seen is not None:
            with self.lock:
                file = self.files.get((seen.st_dev, seen.st_ino))
                if file is not None:
                    file.users += 1
                    return file, seen
        fd = os.open(self.name, OPEN_FLAGS, dir_fd=self.dfd)
        info = os.fstat(fd)
        ident = (info.st_dev, info.st_ino)
        with self.lock:
            file = self.files.get(ident)
            if file is not None:
                file.users += 1
                os.close(fd)  # the one we have is the same file
                return file, info
            file = OpenFile(fd, ident)
            file.users = 1
            if self._subscriber is not None:
                # Watched before any follower can read it (it is in
                # ``files`` below): a write between a read and the watch
                # would never be reported.  The open fd's inode, through
                # /proc: no race with a rename between our open() and the
                # watch.  Without /proc, every write in the directory wakes us.
                file.wd = self._subscriber.watch(f"/proc/self/fd/{fd}".encode(), FILE_MASK)
                if file.wd < 0:
                    self._subscriber.watch(os.fsencode(self.dir), DIR_MASK | FILE_MASK | IN_ONLYDIR)
            self.files[ident] = file
            # What was kept since the last change may be older than this
            # watch: while no follower had the file open, nothing watched
            # it, and a write then (the rest of a copytruncate, say) moved
            # no count.  A follower opening it must not be answered
            # "size 0" from before that write, and wait for a change that
            # will not come (test_follow: a file written while no follower
            # had it open).
            self._drop_kept()
        return file, info

    def close_file(self, file):
        with self.lock:
            file.users -= 1
            if file.users > 0:
                return
            if self.files.get(file.ident) is file:
                del self.files[file.ident]
            # Under the lock, like the watch in open_file(): inotify gives
            # the same inode the same watch, and a follower opening the file
            # again meanwhile would have its watch removed by this one.
            if file.wd >= 0 and self._subscriber is not None:
                self._subscriber.unwatch(file.wd)
        os.close(file.fd)


def reason_of(error):
    """A short reason for an OSError of a log's file or directory."""
    if error.errno == errno.ELOOP:
        return "is a symbolic link"
    if error.errno == errno.ENOENT:
        return "does not exist"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "is not readable (permission denied)"
    return error.strerror or str(error)
