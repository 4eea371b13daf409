"""The producer of ``@@stream-log``: a followed log, as text or server-sent events.

Plain Python (the view in ``browser/stream_log.py`` adds Zope): the follower's
pieces, formatted, with ``guard.idle()`` between them, so the stream waits on
inotify and the client's socket at once and sends heartbeats while idle.

As server-sent events, every stream first says what it follows, before any
data: ``event: stream`` (it starts where it was asked to), or ``event:
switch`` (it was asked to resume at a place, a ``Last-Event-ID``, that is
not in the file followed here: it starts as ``lines=`` says instead).  Both
carry JSON: the instance, the log's name, and for a switch the reason and
where it starts.  Event ids are ``logs.position`` ids: file and offset.
"""

import json
import logging
import random
import threading

from collective.streamguard.logs.follower import LogUnavailable
from collective.streamguard.logs.position import Switch
from collective.streamguard.parking.group import ParkedGroup
from collective.streamguard.streams import EndReason

logger = logging.getLogger("collective.streamguard")
HEARTBEAT = b": keep-alive\n\n"
END_EVENT = b"event: end\ndata: \n\n"
#: Sent when the log can no longer be read; the reason (with its path) goes
#: to the server's log only.
UNAVAILABLE_EVENT = b"event: error\ndata: The log cannot be read any more.\n\n"
#: How long an EventSource waits before it reconnects, drawn per stream
#: from this range (ms): after a restart, a thousand viewers come back
#: spread over several seconds, not all at the browsers' default 3 s.
RETRY_RANGE = (3000, 15000)


def retry_field():
    """The SSE ``retry:`` field of one stream, jittered."""
    return b"retry: %d\n\n" % random.randint(*RETRY_RANGE)


#: Bytes of the file per piece.  As text, a log caught up from its start
#: goes in 1 MiB chunks, which waitress sends without copying them
#: (``waitress.output``); events are split and formatted line by line.
TEXT_PIECE = 1 << 20
SSE_PIECE = 1 << 16
#: The idle timeout of a follower that inotify wakes: only a safety net (the
#: shared instance wakes every follower on a queue overflow, and when a
#: watch goes), and each timeout resumes a parked stream: with thousands of
#: streams a short one would cost a steady stream of steps for nothing.
INOTIFY_SAFETY_NET = 600.0


def piece_size(sse):
    return SSE_PIECE if sse else TEXT_PIECE


def start_event(follower, instance, log, last_lines, event_id=None):
    """The first event of an SSE stream (bytes): ``stream``, or ``switch``
    when the follower did not resume at the place the id names first."""
    about = {"instance": instance, "log": log}
    if follower.switched is None:
        name = b"stream"
    else:
        name = b"switch"
        # Where the stream starts instead: where the client left this file
        # before ("returned"), or the last N lines, or the end.
        if follower.switched == Switch.RETURNED:
            about.update(reason=follower.switched, start="resumed", lines=None)
        else:
            start = "end" if last_lines is None else "lines"
            about.update(reason=follower.switched, start=start, lines=last_lines)
    # JSON escapes CR and LF (and everything else an SSE line cannot hold):
    # one data line whatever the instance's name is.
    data = json.dumps(about, sort_keys=True).encode("ascii")
    if event_id is None:
        return b"event: %s\ndata: %s\n\n" % (name, data)
    return b"event: %s\nid: %s\ndata: %s\n\n" % (name, event_id, data)


class LogStream:
    """The producer of ``@@stream-log``: the follower's pieces, formatted.

    ``instance`` and ``log`` name the stream in its first event (SSE
    only); ``last_lines`` is where a switched stream starts (None: the end).
    """

    def __init__(self, follower, sse, *, instance="", log="", last_lines=None):
        self.follower = follower
        self.sse = sse
        self.instance = instance
        self.log = log
        self.last_lines = last_lines
        self.guard = None  # set when the stream starts (pieces)
        self._after_cr = False  # the last event ended with CR
        self._unsent = ()  # the last read's pieces; _given of them went
        self._given = 0
        # What a wake step read and left to the next step (pieces, or the
        # exception the read raised), or None.
        self._stashed = None
        #: What the last wake step read for others in the same state, for
        #: the FanOut: (the follower's shared state before, the one chunk
        #: or None, the shared state after); else None.
        self.shared_wake = None
        #: The log's FanOut this stream is told of changes by, or None.
        self.fan_out = None

    def close(self):
        """Leave the log's FanOut and close the follower; idempotent.  A
        body the publisher drops without running is closed by the
        follower's own ``__del__``."""
        fan_out, self.fan_out = self.fan_out, None
        if fan_out is not None:
            fan_out.leave(self)
        self.follower.close()

    @property
    def held_bytes(self):
        """Bytes of the log read and not yet handed to the stream: with a
        client that does not read, what this producer holds besides the
        stream's output queue (at most one piece)."""
        held = sum(len(piece.data) for piece in self._unsent[self._given :])
        if isinstance(self._stashed, list):
            held += sum(len(piece.data) for piece in self._stashed)
        return held

    def __call__(self, guard):
        guard.add_cleanup(self.close)
        # It only ever waits in the guard: large pieces may go out in batches.
        guard.batch_output = True
        return self.pieces(guard)

    def pieces(self, guard):
        follower = self.follower
        self.guard = guard
        # Changes wake the guard, through the log's FanOut: no descriptor
        # of our own to wait on, so a parked log stream holds its socket
        # and nothing else.
        notifies = follower.notifies
        if notifies:
            self.fan_out = FanOut.join(self)
        # Sent first, with the first event: how long an EventSource waits
        # to reconnect.  One chunk, not two: a step less for each of a
        # thousand viewers arriving at once (bench_arrivals.py).
        retry = retry_field() if self.sse else b""
        # What the log holds is owed even to a client that half-closed
        # after its request (stream_response(catch_up=True) set
        # guard.catching_up); past it, such a client counts as gone.  Its
        # size is asked when first needed, after a read that did not reach
        # the end: most streams never need it (an fstat less per opening).
        caught_up_at = None
        first = self.sse
        # One piece per read: a step stops once the client's queue is full
        # (parking.stream.OUT_HIGH), and what the generator holds then
        # (the rest of a read) is this stream's memory for as long as the
        # client does not read.  A 1 MiB read held up to 16 SSE pieces
        # more, and their events: 2 MiB per stuck viewer, measured
        # (benchmarks/bench_stuck_readers.py).
        max_bytes = piece_size(self.sse)
        # Parked, a new line is sent by the hub, without a step (below).
        wake_step = self.wake_step if notifies else None
        while True:
            try:
                pieces = self._read(max_bytes, notifies)
            except LogUnavailable as error:
                # The file became something we must not read (a symlink, a
                # hard link) or cannot be read: stop here, having sent
                # nothing of it, and say so.
                logger.warning("log stream stopped: %s", error)
                if self.sse:
                    yield retry + UNAVAILABLE_EVENT
                guard.stop(EndReason.LOG_UNAVAILABLE)
                return
            if first:
                # After the first read, which places a lines= start: with
                # no data to carry an id, this event has the start's id, so
                # that a reconnect before any data resumes right there.
                first = False
                place = None if pieces else follower.event_id
                yield retry + start_event(
                    follower,
                    self.instance,
                    self.log,
                    self.last_lines,
                    None if place is None else place + follower.carried,
                )
                retry = b""  # sent
            # No copy per read (every follower reads at every line): the
            # list and how many of it went, for held_bytes.
            self._unsent, self._given = pieces, 0
            for piece in pieces:
                self._given += 1
                yield self.format(piece)
            if follower.ended:
                # The writer's end marker: tell an EventSource not to
                # reconnect, then finish.
                if self.sse:
                    yield END_EVENT
                return
            if pieces and not follower.at_end:
                if guard.catching_up:
                    if caught_up_at is None:
                        caught_up_at = follower.size
                    if follower.offset >= caught_up_at:
                        guard.catching_up = False
                continue
            guard.catching_up = False  # nothing more was there
            # inotify wakes us at once; the timeout is the safety net (and
            # the whole mechanism where there is no inotify).  A long one with
            # inotify: each timeout resumes a parked stream (thousands of
            # them would cost thousands of steps a second).
            timeout = INOTIFY_SAFETY_NET if notifies else follower.poll_interval
            # The last pieces sent are not kept while idle: their data may be
            # a whole read buffer (1 MiB for text), for hours.
            pieces = None
            self._unsent = ()
            if (yield from guard.idle(timeout, wake_step=wake_step)):
                return

    def _read(self, max_bytes, notified):
        stashed, self._stashed = self._stashed, None
        if stashed is None:
            return self.follower.read(max_bytes, notified=notified)
        if isinstance(stashed, Exception):
            raise stashed
        return stashed

    def wake_step(self):
        """``guard.idle(wake_step=...)`` (the hub's thread, the stream parked
        in ``pieces``' idle()): the events of what the change brought, read
        as ``pieces`` would read them (once for all followers of the path:
        the others' reads are the source's cached answer), when they are all
        it would send before it waits again.  Else None, and what was read
        (or the read's exception) waits in ``_stashed`` for the next step:
        the end marker, more than one piece to catch up, an unreadable log.

        The hub reads at most one SSE piece (64 KiB) of a file that was
        just written (the page cache); a larger append is caught up by
        steps on workers."""
        follower = self.follower
        before, after_cr = follower.shared_state, self._after_cr
        self.shared_wake = None
        try:
            pieces = follower.read(SSE_PIECE, notified=True)
        except Exception as error:
            self._stashed = error
            return None
        if follower.ended or (pieces and not follower.at_end):
            self._stashed = pieces
            return None
        chunks = [self.format(piece) for piece in pieces]
        after = follower.shared_state
        if (
            before is not None
            and after is not None
            and len(chunks) <= 1
            and not (after_cr or self._after_cr or follower.carried)
        ):
            # Read from a state others may share, and formatted as they
            # would format it (FanOut).
            self.shared_wake = (before, chunks[0] if chunks else None, after)
        return chunks

    def in_state(self, state):
        """True when what this stream sends next follows from the follower
        state ``state`` (a ``LogFollower.shared_state``) alone, as for any
        other stream in it (``FanOut``): its follower is in it, and nothing
        of the stream's own changes the events (a CR that ended the last
        piece, a stashed read, ids that carry other places)."""
        follower = self.follower
        return (
            state is not None
            and follower.shared_state is state
            and not self._after_cr
            and self._stashed is None
            and not follower.carried
        )

    def format(self, piece):
        if not self.sse:
            return piece.data  # the file's own bytes: nothing to re-encode
        if self._after_cr or self.follower.carried:
            # Ids that carry other places are this stream's own: not shared.
            return self._format(piece)
        # In a fan-out the followers of a path share their pieces: the
        # event is made once and kept on the piece.
        if piece.event is None:
            piece.event = (self._format(piece), self._after_cr)
        event, self._after_cr = piece.event
        return event

    def _format(self, piece):
        # An SSE data line cannot hold CR or LF: one "data:" field per line;
        # EventSource joins them with "\n" again.  Done on the UTF-8 bytes
        # (no byte of a multi-byte character is CR or LF), with replace()
        # rather than a loop over lines (benchmarks/README.rst: server-sent events).
        data = piece.data
        if self._after_cr and data.startswith(b"\n"):
            # The LF of a CRLF that fell between two pieces: the line break
            # went with the CR.
            data = data[1:]
        self._after_cr = data.endswith(b"\r")
        event_id = piece.event_id + self.follower.carried
        if not data:
            return b"id: %s\n\n" % event_id  # no data: only the place moves
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return b"id: %s\ndata: %s\n\n" % (
            event_id,
            data.replace(b"\n", b"\ndata: "),
        )


class FanOut:
    """The ``LogStream``s of one log in this process, told of its changes
    together, in the hub's thread.

    Each is woken as one follower of the log would be (``guard.wake()``:
    a parked stream runs its ``wake_step`` in the hub, another is resumed).
    But when a parked stream's wake step read from a shared state (the
    source's remembered answer, ``LogFollower.shared_state``), the
    streams after it in that same state do not read, wake or format: each
    ``adopt``s the answer and sends the shared chunk (``guard.send_parked``).

    Streams that are parked in that state afterwards wait in a group (one
    ``parking.group.ParkedGroup`` per format): at the next change one of
    them reads, and the group sends its chunk to the others in one loop
    over their sockets.  A stream that leaves the group (woken, timed out,
    ended) takes the group's state (``_restore``) and is told of changes
    one by one again until it joins again.

    Why: with 10,000 parked viewers of one log, a new line cost 6-8 us of
    Python per viewer around its send (the source, the follower's
    listener, the guard, the parked stream, the wake step, the shared
    read, the event), and the fan-out took about twice as long as the
    stdlib asyncio server's (benchmarks/bench_parked_streams.py).  Shared
    sends made it 3-4 us, about 1.5x asyncio's; a group makes it the send.
    """

    _fan_outs = {}  # LogSource -> FanOut
    _lock = threading.Lock()

    def __init__(self, source):
        self.source = source
        self.members = {}  # LogStream -> None, in the order they came
        #: Members that wait in no group, and ``tuple(loose)``, made again
        #: by the hub after a change of them (None): a thousand arrivals
        #: cost one copy, not one each.
        self.loose = {}
        self.snapshot = None
        #: sse (bool) -> ParkedGroup whose token is (shared state, changes).
        self.groups = {}

    @classmethod
    def join(cls, stream):
        """Tell ``stream`` (its follower opened, inotify reporting) of its
        log's changes; returns the FanOut (``leave`` it when it ends)."""
        source = stream.follower.source
        with cls._lock:
            fan_out = cls._fan_outs.get(source)
            if fan_out is None:
                fan_out = cls._fan_outs[source] = cls(source)
                source.listen(fan_out.changed)
            fan_out.members[stream] = None
            fan_out.loose[stream] = None
            fan_out.snapshot = None
        return fan_out

    def leave(self, stream):
        # A stream ends after it left its group (any end resumes it first).
        with self._lock:
            self.members.pop(stream, None)
            self.loose.pop(stream, None)
            self.snapshot = None
            if not self.members:
                if self._fan_outs.get(self.source) is self:
                    del self._fan_outs[self.source]
                self.source.unlisten(self.changed)

    def changed(self):
        """A change of the log (the hub's thread, ``LogSource.listen``)."""
        changes = self.source.changes
        loose = self.snapshot
        if loose is None:
            with self._lock:
                loose = self.snapshot = tuple(self.loose)
        # Taken before the groups are told: a stream the group's send left
        # with output pending has its line, and is not woken again.
        for sse, group in list(self.groups.items()):
            loose += self._tell_group(sse, group, changes)
        shared_from = shared_to = chunk = sse = None
        for stream in loose:
            # One viewer's failure must not keep the line from the others.
            try:
                follower = stream.follower
                state = follower.shared_state
                if (
                    state is shared_from
                    and stream.sse is sse
                    and stream.in_state(state)
                    and stream.guard.send_parked(chunk, follower.adopt, shared_to, changes)
                ):
                    self._join_group(stream, changes)
                    continue
                stream.shared_wake = None
                stream.guard.wake()
                led = stream.shared_wake
                if led is not None and led[0] is state:
                    shared_from, chunk, shared_to = led
                    sse = stream.sse
                    self._join_group(stream, changes)
            except Exception:
                logger.exception("telling %r of a change failed", stream)

    def _tell_group(self, sse, group, changes):
        """One member reads (its wake step), the group sends its chunk to
        the others; the streams that must be told one by one instead."""
        state = group.token[0]
        while True:
            lead = group.take_one()
            if lead is None:
                del self.groups[sse]
                return ()
            try:
                lead.shared_wake = None
                lead.guard.wake()
                led = lead.shared_wake
            except Exception:
                logger.exception("telling %r of a change failed", lead)
                continue
            if led is not None and led[0] is state:
                before, chunk, after = led
                group.send(chunk, (after, changes))
                self._join_group(lead, changes)
                return ()
            if not lead.in_state(state):
                # It read what cannot be shared (more than one piece, the
                # end marker, an error): so would every member.  All are
                # told one by one, each from the state the group had.
                return tuple(group.dissolve())
            # It did not read (it was resumed, and reads in a step of its
            # own): another member leads.

    def _join_group(self, stream, changes):
        """Let ``stream``, served a shared answer, wait in its format's
        group (made with that answer's state when there is none, or when
        every member has left the last one)."""
        group = self.groups.get(stream.sse)
        if not group:
            state = stream.follower.shared_state
            if state is None:
                return
            group = self.groups[stream.sse] = ParkedGroup(
                (state, changes), self._admit, self._restore
            )
        stream.guard.join_parked_group(group, stream)

    def _admit(self, stream, token):
        # ParkedGroup.admit: the stream's lock held, so its follower is still,
        # and no restore() can put it back among the loose ones meanwhile.
        if not (stream.in_state(token[0]) and stream.follower.at_change(token[1])):
            return False
        with self._lock:
            self.loose.pop(stream, None)
            self.snapshot = None
        return True

    def _restore(self, stream, token):
        # ParkedGroup.restore: the stream's lock held (any thread).
        stream.follower.adopt(*token)
        with self._lock:
            if stream in self.members:
                self.loose[stream] = None
                self.snapshot = None
