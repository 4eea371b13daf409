"""Follow one log file like ``tail -F``: the plain-Python core of ``@@stream-log``.

A log is streamed until the writer puts ``<<<<<EOFMARKER>>>>>`` at the start
of a line.  Instead of reopening the file and sleeping on every turn, here
inotify reports changes (``on_change(guard.wake)``, or ``fileno()`` for
``guard.wait(timeout, readable=[fd])``) and ``read()`` returns what is there
now, as ``Piece`` objects whose exact byte offsets serve as SSE event ids.
The followers of one path in a process share its descriptors, its watches
and, once per change, their questions to the file system (``LogSource``).
Rotation (rename and create, copytruncate, delete and re-create) is followed
by name.  The name is never followed through a symbolic link: the directory
is pinned at ``open()``, the file is opened with ``O_NOFOLLOW`` and must be
a regular file, and a name later swapped for a symbolic link or a
non-regular file makes ``read()`` raise ``LogUnavailable``.

Standard library only; Linux inotify through ctypes (the process' one
instance, ``collective.streamguard.logs.inotify``).  Elsewhere ``notifies`` is
False, ``fileno()`` is -1 and callers wait ``poll_interval``.
"""

import codecs
import logging
import os
import stat
import sys
import threading

from collective.streamguard.logs.position import HEAD
from collective.streamguard.logs.position import TAIL
from collective.streamguard.logs.position import Switch
from collective.streamguard.logs.position import carry
from collective.streamguard.logs.position import event_id
from collective.streamguard.logs.source import LogSource
from collective.streamguard.logs.source import LogUnavailable
from collective.streamguard.logs.source import reason_of
from collective.streamguard.logs.utf8 import InvalidUTF8
from collective.streamguard.logs.utf8 import check_utf8

logger = logging.getLogger("collective.streamguard")

END_MARKER = "<<<<<EOFMARKER>>>>>"

_SAME, _MISSING, _OTHER = "same", "missing", "other"

# Full pieces of at least this size are read into reused buffers: a fresh
# 1 MiB bytes object for every read costs the kernel a page fault and a page
# zeroed per 4 KiB (about a tenth of the serving process' time on a long
# catch-up, by perf).  Up to _POOL_SIZE buffers are kept per follower, and
# let go when a read reaches the end of the file: the catch-up is over.
_POOLED_FROM = 256 * 1024
_POOL_SIZE = 8


class Piece:
    """Text of the log (never empty) and the byte offset just after it.

    ``data`` is the text as UTF-8: where the file held valid UTF-8, the
    file's own bytes as read (no encoding, no copy).  ``text`` is decoded
    from them the first time it is asked for: a stream sending bytes never
    builds it.  ``mark`` is what names the piece's file at ``offset``
    (``(ident, head, tail)``, see ``logs.position``), or None.
    """

    __slots__ = ("offset", "_text", "_data", "event", "mark")

    def __init__(self, text, offset, data=None, mark=None):
        if not (text or data):
            raise ValueError("a piece holds text or data")
        self.offset = offset
        self._text = text
        self._data = data
        self.mark = mark
        #: The piece as a server-sent event, kept by its first formatter:
        #: the followers of a path share their pieces in a fan-out.
        self.event = None

    @property
    def text(self):
        if self._text is None:
            self._text = str(self._data, "utf-8")
        return self._text

    @property
    def data(self):
        if self._data is None:
            self._data = self._text.encode("utf-8")
        return self._data

    @property
    def event_id(self):
        """The SSE id (bytes) of the place just after the piece: its file
        and offset (``logs.position``); the bare offset without a mark."""
        if self.mark is None:
            return b"%d" % self.offset
        return event_id(*self.mark, self.offset)

    def __eq__(self, other):
        if not isinstance(other, Piece):
            return NotImplemented
        return (self.offset, self.text) == (other.offset, other.text)

    __hash__ = None

    def __repr__(self):
        return f"Piece({self.text!r:.60}, {self.offset})"


#: The backward scan for the last N lines reads at most this much: a huge
#: ``lines=`` on a large log costs no more than this (then it starts at the
#: first line that begins within it).
MAX_SCAN_BYTES = 8 << 20
#: Bytes remembered just before the read position (``logs.position.TAIL``),
#: to tell a file that was truncated and grew again past that position
#: (copytruncate) from one that only grew; they are part of the SSE id too.


def _start_of_last_lines(fd, size, count, max_bytes=MAX_SCAN_BYTES):
    """Offset where the last ``count`` complete lines (those ending in a
    newline) begin; a partial line after them is kept.  Reads backwards in
    blocks, so memory stays bounded whatever the line length, and no more
    than ``max_bytes``: then the first line that starts within them."""
    needed = count + 1  # the newline that ends the line before them
    end = size
    floor = max(0, size - max_bytes)
    while end > floor:
        start = max(floor, end - 65536)
        block = os.pread(fd, end - start, start)
        index = len(block)
        while (index := block.rfind(b"\n", 0, index)) >= 0:
            needed -= 1
            if needed == 0:
                return start + index + 1
            last_newline = start + index + 1
        end = start
    if floor == 0 or needed == count + 1:
        return floor
    if os.pread(fd, 1, floor - 1) == b"\n":
        return floor  # a line starts right at the bound
    # The first line that starts within the bound; if that is only the end
    # of the file (one line longer than the bound), the bound: a cut line
    # rather than nothing.
    return last_newline if last_newline < size else floor


# -- what the followers of one path share -------------------------------------


class LogFollower:
    """Follow the file at ``path`` by name, like ``tail -F``.

    Start at byte ``offset`` (0 if it is beyond the current size: the file
    was rotated or truncated), or before the last ``last_lines`` complete
    lines, or else at the end.  ``resume`` (a ``logs.position.ResumePoint``,
    with ``last_lines`` or nothing but no ``offset``) starts where it says if
    that is a place in the file followed now; else ``switched`` says why
    not (a ``logs.position.Switch`` reason) and the follower starts as
    ``last_lines`` says, or, where the id carries a place in this file
    (``Switch.RETURNED``), there.  ``carried`` is what its ids carry along
    (``logs.position``).  A line starting with ``end_marker`` (None or
    "" for none) ends the log: it and everything after it are never returned.
    Pieces cover at most ``max_piece`` bytes of the file.

    The descriptors and watches are the path's ``LogSource``, shared with
    every other follower of the path in the process; a follower itself
    holds only its position.  ``on_change(callback)`` tells of changes
    without any descriptor; ``fileno()`` makes one on demand.
    """

    def __init__(
        self,
        path,
        *,
        offset=None,
        last_lines=None,
        resume=None,
        end_marker=END_MARKER,
        max_piece=65536,
        poll_interval=1.0,
        use_inotify=True,
    ):
        if offset is not None and (last_lines is not None or resume is not None):
            raise ValueError("give offset or last_lines (and resume), not both")
        if (offset or 0) < 0 or (last_lines or 0) < 0:
            raise ValueError("offset and last_lines must not be negative")
        self.path = os.path.abspath(os.fspath(path))
        self._marker = (end_marker or "").encode("utf-8")
        # A held-back tail (marker prefix, or an incomplete UTF-8 sequence)
        # is shorter than this, so a full chunk always makes progress.
        self._min_chunk = len(self._marker) + 4
        self.max_piece = max(int(max_piece), self._min_chunk)
        self.poll_interval = poll_interval
        self._use_inotify = use_inotify
        self._start = (offset, last_lines)
        self._resume = resume
        #: None, or why ``resume`` was not honoured (set by ``open()``).
        self.switched = None
        #: The places in other files that ids of this stream carry (bytes).
        self.carried = b""
        self._source = None
        self._file = None  # the source's OpenFile we read, or None
        self._callbacks = ()  # see on_change()
        # Attributes: at most 29 of them.  CPython 3.11 keeps an instance's
        # values in its class' shared keys up to that; a 30th gives every
        # follower a dict of its own (1.3 KiB more per stream, measured).
        #: The source's shared answer (``LogSource.remember``) this
        #: follower's state came from, while it has not moved since; None
        #: otherwise.  Followers holding the same one are in the same
        #: state: a fan-out (``logs.stream.FanOut``) reads for one of them
        #: and ``adopt``s the answer for the others.
        self.shared_state = None
        self._eventfd = -1  # see fileno()
        self._pos = 0
        self._scan_lines = None  # last_lines, scanned at the first read()
        self._tail = b""  # the TAIL bytes just before _pos, see _truncated()
        self._head = b""  # the file's first min(HEAD, _pos) bytes
        self._at_line_start = True
        #: The source's change count when a read last reached the end of
        #: the file: until it moves, there is nothing new to read.
        self._read_up_to = None
        self._seen = None  # the change count when read() last looked
        self._shared = False  # this read() may use the source's answers
        self._ended = False
        self._error = None
        self._opened = self._closed = False
        # close() from a cleanup in another thread must not close (and let the
        # kernel reuse) an fd that read() is in the middle of using.  Re-entrant:
        # the garbage collector may run a dropped stream's __del__ (and its
        # close()) in the reading thread itself.
        self._lock = threading.RLock()
        # bytearrays of max_piece bytes, see _pooled_buffer(); a tuple while
        # empty (most followers never need one: nothing for the collector).
        self._pool = ()

    # -- public API ---------------------------------------------------------

    def open(self):
        """Open the directory and the file; raise ``LogUnavailable``.

        A file that does not exist yet in an existing directory is fine: it
        is followed from its start once created.
        """
        with self._lock:
            self._open()

    @property
    def notifies(self):
        """True when changes are reported (``on_change``, ``fileno()``):
        else callers wait ``poll_interval`` between reads."""
        return self._source is not None and self._source.changes is not None

    @property
    def source(self):
        """The path's ``LogSource``, shared with its other followers in
        the process (None before ``open()`` and after ``close()``)."""
        return self._source

    def on_change(self, callback):
        """Call ``callback()`` (in another thread, quickly) whenever the
        file may have changed; ``guard.wake`` is the usual one."""
        with self._lock:
            self._callbacks = (*self._callbacks, callback)
            self._listen()

    def _listen(self):
        # Our lock held.  Only a follower that has something to tell is one
        # of the source's listeners: a fan-out's followers are told by
        # their FanOut, and a call each that does nothing would cost every
        # change of the log a call per viewer.  (No flag for it: see the
        # attributes' limit in __init__.)
        source = self._source
        if source is not None and not self._closed and self._changed not in source.listeners:
            source.listen(self._changed)

    def fileno(self):
        """An fd that becomes readable when the file may have changed, or -1
        (nothing reports changes: wait ``poll_interval`` between reads).
        Made on first use: a follower waited on by its guard needs none."""
        with self._lock:
            if self._eventfd < 0 and self.notifies and not self._closed:
                self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._listen()
                # Readable at once if a change came since read() last looked.
                # After the assignment: the hub counts a change before it
                # calls _changed(), so one of the two writes it.
                if self._source.changes != self._seen:
                    os.eventfd_write(self._eventfd, 1)
            return self._eventfd

    def read(self, max_bytes=1 << 20, *, notified=False):
        """Everything available now (about ``max_bytes`` at most), never
        blocking; follows rotation.  Raises ``LogUnavailable`` once the name
        is a symbolic link or not a regular file, and on every call after.

        ``notified``: the caller is woken by ``on_change`` (``LogStream``),
        so everything up to the last reported change is enough: answers
        the path's other followers got since that change are reused, and a
        follower that had read to the end gets [] without a system call.
        A write after the change reports a change of its own.
        """
        with self._lock:
            if self._closed or self._ended:
                return []
            self._open()
            if self._error is not None:
                raise LogUnavailable(self._error)
            self._drain()
            self.shared_state = None  # set again below if it comes from one
            source = self._source
            changes = self._seen = source.changes
            epoch = source.epoch
            if notified and changes is not None and changes == self._read_up_to:
                return []  # read to the end, and nothing happened since
            self._read_up_to = None
            self._shared = notified and changes is not None
            if self._scan_lines is not None and self._file is not None:
                # Here, in the stream, not at open(): the request thread
                # that opened the follower may not even get a stream slot.
                count, self._scan_lines = self._scan_lines, None
                try:
                    size = os.fstat(self._file.fd).st_size
                    self._pos = _start_of_last_lines(self._file.fd, size, count)
                    self._at_line_start = self._pos == 0 or self._byte_before() == b"\n"
                    self._read_marks()
                except OSError as error:
                    self._fail(reason_of(error))
            key = None
            if self._shared and self._scan_lines is None and self._file is not None:
                key = (
                    self._file.ident,
                    self._pos,
                    self._at_line_start,
                    self._tail,
                    self._head,
                    self._marker,
                    self.max_piece,
                    max_bytes,
                )
                known = source.recall(key)
                if known is not None:
                    pieces, self._pos, self._at_line_start, self._tail, self._head, self._ended = (
                        known
                    )
                    self._read_up_to = changes
                    self.shared_state = known
                    return list(pieces)
            pieces = []
            file = self._file
            try:
                if self._follow(pieces, max_bytes) and self._shared:
                    self._read_up_to = changes
                    if key is not None and self._file is file and _small(pieces):
                        # Pieces are not changed once made: shared as they are.
                        state = (
                            self._pos,
                            self._at_line_start,
                            self._tail,
                            self._head,
                            self._ended,
                        )
                        result = (tuple(pieces), *state)
                        if source.remember(key, result, changes, epoch):
                            self.shared_state = result
            except LogUnavailable:
                if not pieces:
                    raise
                # Text read before the name went bad is still delivered (its
                # offset is already counted); the error is sticky, so the
                # next read() raises.
            return pieces

    def adopt(self, shared_state, changes):
        """Take ``shared_state``, the answer another follower in this
        follower's ``shared_state`` got at ``changes`` (a ``read(notified=
        True)`` now would return the same pieces, from the source's cache):
        the state moves as that read would move it, without reading.

        For ``logs.stream.FanOut``, in the hub's thread, while nothing else
        reads this follower (its stream is parked): no lock is taken."""
        _pieces, self._pos, self._at_line_start, self._tail, self._head, self._ended = shared_state
        self._read_up_to = self._seen = changes
        self.shared_state = shared_state

    def at_change(self, changes):
        """True when the last ``read(notified=True)`` read to the end at the
        source's change count ``changes`` (``logs.stream.FanOut``)."""
        return self._read_up_to == changes and self._seen == changes

    @property
    def ended(self):
        """True once a line starting with the end marker was read."""
        return self._ended

    @property
    def at_end(self):
        """True when a ``read(notified=True)`` reached the end of the file
        and no change came since: the next one would return []."""
        source = self._source
        return (
            source is not None
            and self._read_up_to is not None
            and self._read_up_to == source.changes
        )

    @property
    def size(self):
        """Size of the file being followed (0 while there is none)."""
        with self._lock:
            return 0 if self._file is None else os.fstat(self._file.fd).st_size

    @property
    def offset(self):
        """Byte offset, in the current file, just after the last piece."""
        return self._pos

    @property
    def event_id(self):
        """The SSE id (bytes, ``logs.position``) of where the follower is
        now, or None while there is no file at the name."""
        with self._lock:
            if self._file is None or self._scan_lines is not None:
                return None
            return event_id(self._file.ident, self._head, self._tail, self._pos)

    def close(self):
        """Let go of the shared file and directory; idempotent."""
        with self._lock:
            self._closed = True
            self.shared_state = None
            source, self._source = self._source, None
            if source is not None:
                source.unlisten(self._changed)
                if self._file is not None:
                    source.close_file(self._file)
                    self._file = None
                source.release()
            self._callbacks = ()
            fd, self._eventfd = self._eventfd, -1
            if fd >= 0:
                os.close(fd)

    def __del__(self):
        # A follower dropped without close() (a stream body the publisher
        # never ran) still gives back its source's file and directory.  Not
        # at interpreter exit: the process' descriptors go with it.
        if not getattr(self, "_closed", True) and not sys.is_finalizing():
            self.close()

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return f"<LogFollower {self.path!r} at {self._pos}>"

    # -- opening ------------------------------------------------------------

    def _open(self):
        if self._opened:
            return
        if self._closed:
            raise ValueError("the follower is closed")
        self._opened = True
        try:
            self._source = LogSource.acquire(self.path, self._use_inotify)
        except LogUnavailable:
            self._opened = False
            raise
        if self._callbacks:
            self._listen()
        self._seen = self._source.changes
        try:
            info = self._open_file(self._name_info())
            if info is None:
                if self._resume is not None:
                    unknown = self._resume.offset is None
                    self.switched = Switch.UNKNOWN_ID if unknown else Switch.NO_FILE
                    self.carried = carry((self._resume, *self._resume.carried))
                return  # followed from 0 once it exists
            offset, last_lines = self._start
            size = info.st_size
            if self._resume is not None:
                place, self.switched, self.carried = self._resume.choose(
                    self._file.fd, self._file.ident, size
                )
                if place is not None:
                    offset, last_lines = place, None
            if last_lines is not None:
                self._scan_lines = last_lines
                self._pos = size
            elif offset is not None:
                self._pos = offset if offset <= size else 0
            else:
                self._pos = size
            self._at_line_start = self._pos == 0 or self._byte_before() == b"\n"
            self._read_marks()
        except OSError as error:
            self.close()
            raise LogUnavailable(f"{self.path} {reason_of(error)}") from None
        except BaseException:
            self.close()
            raise

    def _open_file(self, seen):
        """Open the file at the name, whose ``_name_info()`` is ``seen``;
        its ``os.stat_result``, or None if there is none."""
        # lstat first (``seen``): opening a device node can have side
        # effects, and O_NOFOLLOW alone would still open one.
        if seen is None:
            return None
        try:
            file, info = self._source.open_file(seen)
        except FileNotFoundError:
            return None
        except OSError as error:
            self._fail(reason_of(error))
        problem = None
        if not stat.S_ISREG(info.st_mode):  # swapped between lstat and open
            problem = "is not a regular file"
        elif info.st_nlink > 1:
            problem = f"has {info.st_nlink} hard links"
        elif info.st_size == 0 and not file.checked:
            # A procfs or sysfs file reads data while its size says 0: it
            # would be sent again from its start at every change.  Its size
            # is asked again after the read: an empty log written to just
            # then has grown, and is a log after all.  Asked once per open
            # file: where a file lives does not change.
            try:
                if os.pread(file.fd, 1, 0) and os.fstat(file.fd).st_size == 0:
                    problem = "reads data while its size is 0 (a pseudo-file)"
            except OSError as error:
                problem = reason_of(error)
        if problem is not None:
            self._source.close_file(file)
            self._fail(problem)
        file.checked = True
        self._file = file
        return info

    def _name_info(self):
        """The name's ``os.stat_result`` (not followed), or None when there
        is none; fails unless it is a regular file with one link."""
        try:
            info = self._source.stat_name(self._shared)
        except FileNotFoundError:
            return None
        except OSError as error:
            self._fail(reason_of(error))
        if stat.S_ISLNK(info.st_mode):
            self._fail("is a symbolic link")
        if not stat.S_ISREG(info.st_mode):
            self._fail("is not a regular file")
        if info.st_nlink > 1:
            # A hard link to another file moved in place of the log: never
            # followed like a rotation.
            self._fail(f"has {info.st_nlink} hard links")
        return info

    def _place(self, info):
        """Where the name whose ``_name_info()`` is ``info`` points: our
        file, another file, or nowhere."""
        if info is None:
            return _MISSING
        if self._file is not None and (info.st_dev, info.st_ino) == self._file.ident:
            return _SAME
        return _OTHER

    def _fail(self, reason):
        self._error = f"{self.path} {reason}"
        raise LogUnavailable(self._error)

    def _close_file(self):
        file, self._file = self._file, None
        self._source.close_file(file)

    # -- changes ------------------------------------------------------------

    def _changed(self):
        # The hub's thread, for every inotify event of the path.
        if self._eventfd >= 0:
            try:
                os.eventfd_write(self._eventfd, 1)
            except OSError:
                pass  # closed meanwhile
        for callback in self._callbacks:
            callback()

    def _drain(self):
        # Drained before reading: a write after this point leaves the fd
        # readable, so no change is ever missed between read() and wait().
        if self._eventfd >= 0:
            try:
                os.eventfd_read(self._eventfd)
            except BlockingIOError:
                pass

    # -- reading ------------------------------------------------------------

    def _follow(self, pieces, budget):
        """Read what is there; True when the end of the file at the name
        was reached (nothing more to read until the next change)."""
        while True:
            seen = self._name_info()
            where = self._place(seen)
            if self._file is None:
                if self._open_file(seen) is None:
                    return True
                self._pos, self._at_line_start, self._tail, self._head = 0, True, b"", b""
                where = _SAME
            elif self._was_truncated():
                # copytruncate: the file shrank under us (or shrank and grew
                # past our position before we looked); its new content
                # starts at 0.
                self._pos, self._at_line_start, self._tail, self._head = 0, True, b"", b""
            # Once the name points elsewhere, this file only gets what the
            # writer still had buffered: read it to its end, hold nothing back.
            used, at_end = self._read_into(pieces, budget, final=where is _OTHER)
            budget -= used
            if self._ended or not at_end:
                return self._ended
            if where is not _OTHER:
                return True
            self._close_file()

    # The source's answers since the last change (``self._shared``) are as
    # fresh as that change, and a follower can know more: its start was
    # placed by a look of its own (an offset, a resume id, the scan for
    # the last lines), after writes whose change the hub has not counted
    # yet.  An answer that is only older makes a read come up short, and
    # that change, when counted, wakes it again.  But an older answer must
    # never decide a truncation (the follower would start the file again,
    # and send it twice): that is believed only when a look of its own
    # says so too.  test_log_resume sent a log twice so, once in 1,200
    # runs.  Once it is believed, the kept answers go: their bytes may be
    # the file's from before the truncation.  (The name's answer cannot be
    # older than the file a follower opened: opening a file clears the
    # source's answers.)

    def _was_truncated(self):
        """True when the file was truncated under us (copytruncate)."""
        if not self._truncated(self._shared):
            return False
        if not self._shared:
            return True
        if not self._truncated(False):
            return False
        self._source.forget(self._seen)
        return True

    def _truncated(self, shared):
        """True when the file is shorter than our position, or its bytes
        before it are not the ones we read there (truncated and written
        again past it)."""
        if self._source.size(self._file, shared) < self._pos:
            return True
        tail = self._tail
        if not tail:
            return False
        before = self._source.pread(self._file, len(tail), self._pos - len(tail), shared)
        return before != tail

    def _byte_before(self):
        # Asked for a position placed from outside: never an older answer.
        return self._source.pread(self._file, 1, self._pos - 1)

    def _read_marks(self):
        """Read ``_head`` and ``_tail`` for a position set from outside
        (start, resume, the scan for the last lines); reading keeps them."""
        pos, fd = self._pos, self._file.fd
        self._head = os.pread(fd, min(HEAD, pos), 0) if pos else b""
        start = max(0, pos - TAIL)
        self._tail = os.pread(fd, pos - start, start) if pos else b""

    def _read_into(self, pieces, budget, final):
        """Read from ``self._pos`` up to about ``budget`` bytes or the end of
        the file; return (bytes read, whether the end was reached)."""
        used = 0
        file = self._file
        while used < budget:
            want = min(self.max_piece, max(budget - used, self._min_chunk))
            buffer = self._pooled_buffer() if want == self.max_piece >= _POOLED_FROM else None
            try:
                if buffer is not None:
                    count = os.preadv(file.fd, [buffer], self._pos)
                    data = buffer if count == want else bytes(memoryview(buffer)[:count])
                elif want < _POOLED_FROM:
                    data = self._source.pread(file, want, self._pos, self._shared)
                else:
                    data = os.pread(file.fd, want, self._pos)
            except OSError as error:
                self._fail(f"cannot be read: {reason_of(error)}")
            used += len(data)
            at_end = len(data) < want  # a regular file reads short only at its end
            if at_end:
                self._pool = ()
            taken = self._take(data, pieces, final and at_end)
            if at_end or self._ended or not taken:
                return used, at_end or not taken
        return used, False

    def _pooled_buffer(self):
        """A buffer of ``max_piece`` bytes that nothing else refers to, or None.

        A piece's data is the buffer itself (a bytearray) while the piece,
        or a memoryview of it queued for sending, is alive; only the pool,
        the loop and getrefcount's argument refer to a buffer free to be
        read into again.
        """
        for buffer in self._pool:
            if sys.getrefcount(buffer) == 3:  # the pool, the loop, the argument
                return buffer
        if len(self._pool) < _POOL_SIZE:
            buffer = bytearray(self.max_piece)
            self._pool = [*self._pool, buffer]
            return buffer
        return None

    def _take(self, data, pieces, final):
        """Turn ``data`` (the bytes at ``self._pos``) into a piece, holding
        back what cannot be decided yet; return the number of bytes taken."""
        end = len(data)
        marker = self._marker
        if marker:
            hit = self._find_marker(data)
            if hit >= 0:
                end = hit
                self._ended = True
            elif not final:
                # A last line that could still grow into the marker waits
                # until a byte decides it (a writer may put it out in several writes).
                start = data.rfind(b"\n") + 1
                if (start or self._at_line_start) and end - start < len(marker):
                    if marker.startswith(data[start:]):
                        end = start
        view = memoryview(data)[:end]
        try:
            text, taken = check_utf8(data, view, final)
        except InvalidUTF8:
            # Invalid bytes: U+FFFD for each, and the text re-encoded.
            text, taken = codecs.utf_8_decode(view, "replace", final)
            raw = None
        else:
            raw = data if taken == len(data) else data[:taken]
        if taken:
            before = self._pos
            self._pos += taken
            self._at_line_start = data[taken - 1] == 0x0A
            # The TAIL bytes before the position and the file's first HEAD
            # bytes, kept exact as the position moves: they name the file
            # in the SSE id (logs.position), and a tail shorter than TAIL
            # would miss a rewrite _truncated() can see.
            if taken >= TAIL:
                self._tail = bytes(data[taken - TAIL : taken])
            else:
                self._tail = (self._tail + bytes(data[:taken]))[-TAIL:]
            if before < HEAD:
                self._head += bytes(data[: min(taken, HEAD - before)])
            pieces.append(Piece(text, self._pos, raw, (self._file.ident, self._head, self._tail)))
        return taken

    def _find_marker(self, data):
        """Where a line starting with the end marker starts in ``data``, or -1."""
        marker = self._marker
        if self._at_line_start and data.startswith(marker):
            return 0
        # The marker's first byte is looked for with memchr (a one-byte
        # find), then checked.  Searching for "\n" + marker instead stops
        # at every newline: on a log of short lines that costs more than
        # reading the file (bench_follow_throughput.py).
        first = marker[:1]
        index = data.find(first, 1)
        misses = 0
        while index >= 0:
            if data[index - 1] == 0x0A and data.startswith(marker, index):
                return index
            misses += 1
            if misses > 8:  # a common byte in this log: search the other way
                found = data.find(b"\n" + marker, index)
                return found + 1 if found >= 0 else -1
            index = data.find(first, index + 1)
        return -1


def _small(pieces, limit=65536):
    """Small enough to keep for the other followers, and no piece is a
    follower's reused read buffer (a bytearray)."""
    size = 0
    for piece in pieces:
        data = piece._data
        if type(data) is bytearray:
            return False
        size += len(piece._text if data is None else data)
    return size <= limit
