"""The process's live streams: how many, who, how they ended; and shutdown.

A live stream that cannot park (``hub``) holds a server worker thread for
its whole life (waitress runs 4), so the number of such *held* streams per
process is capped and the cap leaves one thread for normal pages.  Streams
that may park have a cap of their own (``PARKABLE`` slots: file descriptors
are what they use up); one that turns out not to park takes a held slot.
``live_streams`` also keeps what a status view shows (live streams, counters
per end reason) and, at interpreter exit, stops the live streams so that
their cleanups run (waitress' worker threads are daemons: without this they
would just vanish mid-transaction).

Plain Python: imports nothing from Zope.
"""

import atexit
import collections
import enum
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from dataclasses import field

logger = logging.getLogger("collective.streamguard")

#: How long, at interpreter exit, live streams get to run their cleanups.
SHUTDOWN_TIMEOUT = 5.0


class EndReason(str, enum.Enum):  # noqa: UP042 (str() stays "EndReason.X")
    """Why a stream ended."""

    FINISHED = "finished"
    CLIENT_GONE = "client gone"
    TIMEOUT = "timeout"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    #: The followed log became something that must not be read (a symbolic
    #: link, a hard link, unreadable) or could not be read.
    LOG_UNAVAILABLE = "log unavailable"


#: The two kinds of stream slots.
HELD = "held"
PARKABLE = "parkable"
#: Counted besides the kind: streams with a ZODB connection of their own
#: (``stream_response(zodb=True)``), which has a cap of its own.
ZODB = "zodb"


class Refused(str, enum.Enum):  # noqa: UP042
    """Why ``LiveStreams.reserve`` gave no slot."""

    BUSY = "busy"  # the process' cap
    ZODB_BUSY = "zodb busy"  # the cap of streams with a ZODB connection of their own
    USER_LIMIT = "user limit"  # the user's own cap
    SHUTDOWN = "shutdown"


@dataclass
class StreamRecord:
    """What ``LiveStreams`` knows of one live stream (a status view shows it)."""

    id: int
    label: str
    #: The name of the log it follows (``@@stream-log``), else "".
    log: str
    #: Whom the stream's slot counts against (``reserve``'s ``user``).
    user_key: str
    user: str
    client: str
    probe: str
    started: float = field(default_factory=time.time)
    bytes_sent: int = 0
    #: Of bytes_sent, those queued on waitress' channel without a copy.
    bytes_direct: int = 0
    #: The stream's guard while it is live; None once it has ended.
    guard: object = field(default=None, repr=False, compare=False)
    #: The kind of slot it takes: HELD (a thread) or PARKABLE.
    kind: str = HELD
    #: It holds a ZODB connection of its own (counted under ``ZODB``).
    zodb: bool = False

    @property
    def is_parked(self):
        """True while the hub watches the stream (no thread held)."""
        parked = getattr(self.guard, "parked", None)
        return parked is not None and parked.state == "parked"


class LiveStreams:
    """Live streams, per-reason counters and the per-process stream cap."""

    def __init__(self):
        # Re-entrant: a dropped stream's finalizer (``discard``) runs when
        # the garbage collector does, which may be inside ``start()`` in the
        # same thread, with this lock held (a plain Lock deadlocked there).
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._live = {}
        self._reserved = 0
        self._kinds = collections.Counter()  # slots taken per kind
        self._by_user = collections.Counter()  # slots held per user name
        self._ended = threading.Condition(self._lock)
        self.counters = {reason: 0 for reason in EndReason}
        self.refused = 0
        self.shutting_down = threading.Event()

    def reserve(self, limit, user="", user_limit=None, kind=HELD, zodb_limit=None):
        """Take a stream slot for ``user``; None when taken, else a ``Refused``.

        A slot is refused when ``limit`` slots of this ``kind`` are taken,
        or ``user_limit`` by this user (None or below 1: no cap), whatever
        the kind.  ``zodb_limit`` (not None): the stream will hold a ZODB
        connection of its own, and at most that many such streams live.  A
        reserved slot is given back by ``end`` or ``release``.
        """
        zodb = zodb_limit is not None
        with self._lock:
            refusal = None
            if self.shutting_down.is_set():
                refusal = Refused.SHUTDOWN
            elif limit is not None and limit >= 1 and self._kinds[kind] >= limit:
                refusal = Refused.BUSY
            elif zodb and self._kinds[ZODB] >= max(zodb_limit, 1):
                refusal = Refused.ZODB_BUSY
            elif user_limit is not None and user_limit >= 1 and self._by_user[user] >= user_limit:
                refusal = Refused.USER_LIMIT
            if refusal is not None:
                self.refused += 1
                return refusal
            self._reserved += 1
            self._kinds[kind] += 1
            self._kinds[ZODB] += zodb
            self._by_user[user] += 1
            return None

    def hold(self, record, limit):
        """A PARKABLE stream that will hold its thread after all: move it to
        a HELD slot if fewer than ``limit`` are taken.  True if it has one."""
        with self._lock:
            if record.kind == HELD:
                return True
            if limit is not None and limit >= 1 and self._kinds[HELD] >= limit:
                self.refused += 1
                return False
            self._kinds[record.kind] -= 1
            self._kinds[HELD] += 1
            record.kind = HELD
            return True

    def unhold(self, record):
        """A stream that took a HELD slot with ``hold`` parks after all:
        back to its PARKABLE slot."""
        with self._lock:
            if record.kind != HELD or record.id not in self._live:
                return
            self._kinds[HELD] -= 1
            self._kinds[PARKABLE] += 1
            record.kind = PARKABLE

    def _give_back(self, user, kind=HELD, zodb=False):
        self._reserved -= 1
        self._kinds[kind] -= 1
        self._kinds[ZODB] -= zodb
        self._by_user[user] -= 1
        if self._by_user[user] <= 0:
            del self._by_user[user]
        self._ended.notify_all()

    def release(self, user="", kind=HELD, zodb=False):
        """Give back a slot that was reserved but never started."""
        with self._lock:
            self._give_back(user, kind, zodb)

    def start(
        self,
        guard,
        label="",
        user="",
        client="",
        probe="",
        log="",
        user_key=None,
        reserved=False,
        kind=HELD,
        zodb=False,
    ):
        """Record a new stream; returns its ``StreamRecord``.

        ``user_key``: whom the slot counts against (default: ``user``).
        ``reserved``: the caller took a slot with ``reserve``; otherwise one
        is taken here, whatever the cap.  ``zodb``: it was reserved with a
        ``zodb_limit``.
        """
        user_key = user if user_key is None else user_key
        with self._lock:
            if not reserved:
                self._reserved += 1
                self._kinds[kind] += 1
                self._kinds[ZODB] += zodb
                self._by_user[user_key] += 1
            record = StreamRecord(
                id=next(self._ids),
                label=label,
                log=log,
                user=user,
                user_key=user_key,
                client=client,
                probe=probe,
                guard=guard,
                kind=kind,
                zodb=zodb,
            )
            self._live[record.id] = record
            return record

    def end(self, record, reason):
        """Record the end of a stream and give back its slot (once)."""
        with self._lock:
            if self._live.pop(record.id, None) is None:
                return
            self.counters[reason] += 1
            self._give_back(record.user_key, record.kind, record.zodb)
        # The record outlives the stream (the GuardedStream's finalizer
        # holds it): through its guard it would keep the stream itself, its
        # producer and its connection alive for good, and the finalizer
        # would never run.
        record.guard = None

    def discard(self, record):
        """Forget a stream that was dropped without being run or closed.

        Zope's publisher drops the response body without closing it when it
        retries a request after a ConflictError, or when publishing fails
        after the view returned.  The stream's finalizer calls this, so the
        slot comes back and the cleanups still run once.
        """
        with self._lock:
            if self._live.pop(record.id, None) is None:
                return
            # Publishing failed after the view returned the stream.
            self.counters[EndReason.ERROR] += 1
            self._give_back(record.user_key, record.kind, record.zodb)
        logger.warning("stream %d was dropped before it ran: %s", record.id, record.label)
        guard, record.guard = record.guard, None
        if guard is not None:
            guard.reason = EndReason.ERROR
            guard.run_cleanups()

    def live(self):
        """A snapshot (list of ``StreamRecord``) of the live streams."""
        with self._lock:
            return list(self._live.values())

    @property
    def reserved(self):
        return self._reserved

    def snapshot(self):
        """Counters and live streams as plain data, for status views and tests."""
        with self._lock:
            live = list(self._live.values())
            return {
                "live": len(live),
                "parked": sum(1 for record in live if record.is_parked),
                "holding_a_thread": sum(1 for record in live if not record.is_parked),
                "reserved": self._reserved,
                "reserved_held": self._kinds[HELD],
                "reserved_parkable": self._kinds[PARKABLE],
                "reserved_zodb": self._kinds[ZODB],
                "refused": self.refused,
                "ended": {reason.value: count for reason, count in self.counters.items()},
            }

    def begin_shutdown(self):
        """Tell every live stream to stop, and refuse new ones; do not wait."""
        self.shutting_down.set()
        for record in self.live():
            if record.guard is not None:
                record.guard.wake()

    def shutdown(self, timeout=SHUTDOWN_TIMEOUT):
        """Stop every live stream and wait up to ``timeout`` s for their cleanups.

        New streams are refused from now on.  Returns the number of streams
        still live when the wait ended.
        """
        self.begin_shutdown()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._live and time.monotonic() < deadline:
                self._ended.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            left = len(self._live)
        if left:
            logger.warning("%d stream(s) still running at shutdown", left)
        return left


#: The live streams of this process.
live_streams = LiveStreams()


@atexit.register
def _stop_streams_at_exit():
    # atexit runs in the main thread while the server's daemon worker threads
    # still exist: wake the streams so they abort their transactions and
    # close their connections instead of vanishing at finalization.
    if live_streams.live():
        live_streams.shutdown()
