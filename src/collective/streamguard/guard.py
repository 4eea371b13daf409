"""Guarded streaming: a producer that stops the moment its client leaves.

A producer is a generator (or a callable taking a ``StreamGuard`` and
returning one) that yields ``bytes`` or ``str`` chunks.  ``GuardedStream``
turns it into a WSGI body iterable that

- asks the client connection before every chunk and stops the producer
  (``GeneratorExit`` at its current ``yield``) once the client has gone, the
  maximum duration has passed, or the process is shutting down;
- lets the producer sleep for more work in ``guard.wait()`` / ``guard.idle()``,
  which wake the instant the client leaves (poll on the client socket), when
  one of the producer's own fds becomes readable, or on ``guard.wake()``;
- runs the cleanups exactly once, whatever ended the stream: the producer
  finishing or raising, the client leaving, the server closing the iterator
  after a failed write (waitress catches ``ClientDisconnected`` and calls
  ``close()``), or shutdown.  A cleanup that raises is logged and the others
  still run;
- logs the start and the end (reason, bytes, duration) and keeps the process
  process's ``live_streams`` (the streams, counters) up to date.

What it guards against: a log loop that held a worker thread for a client
long gone, and an error path that crashed after the client left and skipped
the application's own clean-up.  Plain Python: imports nothing from Zope.
"""

import logging
import os
import select
import sys
import threading
import time

from collective.streamguard.connection import CLOSE_EVENTS
from collective.streamguard.connection import RECHECK_INTERVAL
from collective.streamguard.connection import ConnectionState
from collective.streamguard.streams import EndReason
from collective.streamguard.streams import live_streams

logger = logging.getLogger("collective.streamguard")

_STOP, _READY, _TIMEOUT = "stop", "ready", "timeout"
#: What a wait ends with; the hub hands them to a parked idle().
STOP, READY, TIMEOUT = _STOP, _READY, _TIMEOUT


class _Park(bytes):
    """The type of ``PARK``."""


#: The park protocol's sentinel: what ``idle()`` yields to its driver
#: (``GuardedStream.step()``'s caller) when the stream may park, meaning
#: "let my thread go until a wake condition": ``park_deadline`` and
#: ``park_readable`` say which; the driver parks the stream and, once a
#: condition fired, hands ``resume(outcome)`` what ``idle()`` returns.
#: Empty bytes matched by identity: a wrapper that transforms chunks
#: passes bytes on, and a server ignores empty chunks.
PARK = _Park()

#: Chunks of at least this size go straight onto a waitress channel where
#: that is exact (``collective.streamguard.waitress.output``); smaller ones
#: cost less to copy than to hand over.
DIRECT_MIN = 64 * 1024

#: A stream that may park but keeps its thread longer than this without
#: parking (a busy producer, or one that sleeps with ``time.sleep``,
#: ``wait_closed`` or ``wait_for_disconnect``) counts against the thread cap
#: from then on, until it parks.  Long enough for a log stream to send its
#: last lines before it parks, short against a page's wait.
HOLD_GRACE = 1.0


class StreamError(Exception):
    """Raise it (or a subclass) from a producer or an ending to end the
    stream as failed (``EndReason.ERROR``) with a message: one warning line
    in the log, no traceback.  Any other exception is logged with its
    traceback."""


class StreamFailed(Exception):
    """What a server other than waitress gets from a stream that failed
    after its headers went out: it then drops the connection without the
    body's clean end, and the client can tell (waitress is told directly)."""


class StreamGuard:
    """What a producer sees of its stream: the client, the clock, its cleanups.

    ``max_duration`` (seconds, None for no limit) ends the stream with
    TIMEOUT.  ``heartbeat`` (bytes, e.g. ``b": keep-alive\\n\\n"`` for
    server-sent events) is yielded by ``idle()`` after ``heartbeat_interval``
    seconds without output, so proxies keep the connection and a peer that
    vanished without FIN or reset is found by the write.
    """

    def __init__(
        self,
        connection,
        max_duration=None,
        heartbeat=None,
        heartbeat_interval=None,
        live_streams=live_streams,
    ):
        self.connection = connection
        self.max_duration = max_duration or None
        self.heartbeat = heartbeat if heartbeat_interval else None
        self.heartbeat_interval = heartbeat_interval or None
        self.live_streams = live_streams
        self.reason = None
        #: The producer's own ZODB connection and transaction
        #: (``stream_response(zodb=True)``: a ``zodb.ZODBSession``), else None.
        self.zodb = None
        #: A producer that yields large chunks and blocks nowhere but in
        #: wait()/idle() may set this: under waitress its large chunks are
        #: then handed over in batches while the server still has output to
        #: send, which is faster (waitress.output).  Otherwise each goes out
        #: at once.
        self.batch_output = False
        #: A producer sets this while it sends what was already there when
        #: the request came (a log's last lines): a client that half-closed
        #: its connection after the request is served that much.
        self.catching_up = False
        #: Called before the producer sleeps in wait()/idle(): output held
        #: back for a busy I/O thread must not wait with it.
        self.before_wait = None
        self.started = time.monotonic()
        self.last_output = self.started
        # Empty tuples until something is added: shared, and nothing for
        # the garbage collector to track (each parked stream has a guard).
        self._endings = ()
        self._cleanups = ()
        #: (enter, leave) pairs run around every step of a parked stream, in
        #: whatever thread runs it (``add_step_hooks``).
        self._step_hooks = ()
        # The wake pipe is made by the first blocking wait: a parked stream
        # never needs one (the hub wakes it), so it holds no fds of its own.
        self._wake_r = self._wake_w = -1
        self._woken = False
        #: Set by ``GuardedStream`` when it may park the stream: ``idle()``
        #: then yields ``PARK`` with ``park_deadline``/``park_readable``.
        self.parkable = False
        self.park_deadline = None
        self.park_readable = ()
        #: ``idle(wake_step=...)`` of the parked producer, or None.
        self.park_wake_step = None
        #: The hub's record of the stream once it has parked, else None.
        self.parked = None
        #: ``on_hold(why)``: called when a stream that may park turns out to
        #: hold its thread (it cannot park, it waits in ``wait()``, or it
        #: keeps its thread without parking): where the thread cap is
        #: applied (``streaming``).
        self.on_hold = None
        self._outcome = None

    # -- what ends a stream -------------------------------------------------

    def check(self):
        """Return the reason the stream must stop now, or None to go on."""
        if self.reason is not None:
            return self.reason
        if self.live_streams.shutting_down.is_set():
            return EndReason.SHUTDOWN
        parked = self.parked
        if parked is not None:
            # The hub watches a parked stream's socket (EPOLLRDHUP, HUP,
            # ERR) and marks it the moment the client leaves: no probe, no
            # system call per step.
            if parked.gone:
                return EndReason.CLIENT_GONE
        elif self.connection.state().state is ConnectionState.CLOSED:
            return EndReason.CLIENT_GONE
        if self.max_duration and time.monotonic() - self.started >= self.max_duration:
            return EndReason.TIMEOUT
        return None

    def stop(self, reason):
        """End the stream with ``reason`` (an ``EndReason``) at its next step:
        for a producer that knows better than "finished" why it returns."""
        if self.reason is None:
            self.reason = reason

    @property
    def stopping(self):
        """True once the stream must stop (client gone, timeout, shutdown)."""
        return self.check() is not None

    # -- waiting for work ---------------------------------------------------

    def wait(self, timeout=None, readable=()):
        """Sleep until ``timeout``, ``wake()``, a ``readable`` fd, or the end.

        Use it instead of ``time.sleep`` in a producer.  Returns True when
        the stream must stop (the client left, the time is up, shutdown),
        False otherwise.
        """
        if self.parkable and self.parked is None:
            self.hold()  # a blocking wait holds the thread: it cannot park
        return self._wait(timeout, readable) is _STOP

    def idle(self, timeout=None, readable=(), wake_step=None):
        """``wait()`` for generators: ``stop = yield from guard.idle(5)``.

        Yields the heartbeat whenever ``heartbeat_interval`` passes without
        output while it waits; returns like ``wait()``.

        ``wake_step``: while the stream is parked, a ``wake()`` in the hub's
        thread may call ``wake_step()`` instead of resuming the producer.
        It returns the chunks (a list of bytes) the producer would yield
        before it waited in ``idle()`` again, having moved the producer's
        state on as if it had, or None when it cannot tell (the producer is
        then resumed as usual, and finds what ``wake_step`` took).  It runs
        in the hub's thread with the stream's lock held (no step hooks, no
        blocking call) and never raises.  A thousand followers of one log
        get a new line this way, without a step each on a worker
        (``logs.stream.LogStream``; docs/parked-streams.rst).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = None if deadline is None else deadline - time.monotonic()
            if self.heartbeat is not None:
                due = self.last_output + self.heartbeat_interval - time.monotonic()
                step = due if step is None else min(step, due)
                if due <= 0:
                    yield self.heartbeat
                    continue
            outcome = None
            if self.parkable:
                # The driver parks the stream (the hub sends heartbeats and
                # sets the outcome), or cannot and then yields to us again.
                self._outcome = None
                self.park_deadline, self.park_readable = deadline, readable
                self.park_wake_step = wake_step
                yield PARK
                self.park_wake_step = None
                outcome, self._outcome = self._outcome, None
            if outcome is None:
                outcome = self._wait(step, readable)
            if outcome is _STOP:
                return True
            if outcome is _READY or (deadline is not None and time.monotonic() >= deadline):
                return False

    def wake(self):
        """Interrupt a ``wait()``/``idle()`` from any thread (new work, shutdown)."""
        # The flag first: a wait that makes its pipe, or a stream that
        # parks, after this line still sees it.
        self._woken = True
        parked = self.parked
        if parked is not None:
            parked.wake()
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # the pipe is full (already woken) or the stream has ended

    # -- the park protocol (collective.streamguard.parking) -------------------

    @property
    def woken(self):
        """True when ``wake()`` was called since the last wait ended."""
        return self._woken

    def take_wake(self):
        """A parked stream's driver served the last ``wake()`` with the
        producer's ``wake_step``: the producer stays in ``idle()``."""
        self._woken = False

    def send_parked(self, chunk, advance, *args):
        """In the hub's thread, while the stream is parked in ``idle(wake_step
        =...)`` with nothing pending and nothing ending it: run
        ``advance(*args)`` and send ``chunk`` (bytes or None), the producer
        staying in ``idle()``, as if its ``wake_step`` had returned
        ``[chunk]``; True if done.  False, having done nothing, otherwise
        (the caller then ``wake()``s it as usual).  For a producer's own
        helper that serves many parked streams one answer
        (``logs.stream.FanOut``)."""
        parked = self.parked
        return parked is not None and parked.send_shared(chunk, advance, args)

    def join_parked_group(self, group, item):
        """In the hub's thread, while the stream is parked as for
        ``send_parked``: wait in ``group`` (a ``parking.group.ParkedGroup``)
        as ``item``, which the group's ``admit`` checks and its ``restore``
        gets back when the stream leaves; True if it does.  Until then
        ``group.send()`` sends this stream what it sends all its members,
        the producer staying in ``idle()``; any wake, timeout or end takes
        it out first.  False (a stream that is not parked, or not in that
        state): the caller goes on as with ``send_parked``."""
        parked = self.parked
        return parked is not None and parked.join_group(group, item)

    def resume(self, outcome):
        """What a parked ``idle()`` returns with, handed over by the stream's
        driver before the producer's next step: ``READY`` (a wake, or a
        readable fd; it uses up the wake), ``STOP``, ``TIMEOUT``, or None
        (not resumed from an ``idle()``: it waits again in this thread)."""
        if outcome is _READY:
            self._woken = False
        self._outcome = outcome

    def hold(self):
        """The stream will hold its thread: stop asking to park."""
        self.parkable = False
        on_hold, self.on_hold = self.on_hold, None
        if on_hold is not None:
            on_hold("it cannot park, or waits in guard.wait()")

    def add_step_hooks(self, enter, leave):
        """Run ``enter()`` before and ``leave()`` after each step of the
        producer once its stream has parked (each may run in another
        thread); ``leave()`` also runs just before the first park.  For
        thread-locals the producer needs (``zodb.ZODBSession``)."""
        self._step_hooks = (*self._step_hooks, (enter, leave))

    def enter_step(self):
        for enter, _leave in self._step_hooks:
            enter()

    def leave_step(self):
        for _enter, leave in reversed(self._step_hooks):
            try:
                leave()
            except Exception:
                logger.exception("leaving a step of a stream failed: %r", leave)

    def _wait(self, timeout, readable):
        if self.before_wait is not None:
            self.before_wait()
        if self._wake_r < 0:
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            self._wake_r, self._wake_w = wake_r, wake_w
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0)
        if self.max_duration:
            end = self.started + self.max_duration
            deadline = end if deadline is None else min(deadline, end)
        while True:
            if self.check() is not None:
                return _STOP
            if self._woken:
                self._drain_wakeups()
                return _READY
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return _TIMEOUT
            step = RECHECK_INTERVAL if deadline is None else min(RECHECK_INTERVAL, deadline - now)
            poller = select.poll()
            client_fd = self.connection.fileno()
            if client_fd >= 0:
                # Close events only: pipelined request bytes must not wake us.
                poller.register(client_fd, CLOSE_EVENTS)
            poller.register(self._wake_r, select.POLLIN)
            for fd in readable:
                poller.register(fd, select.POLLIN)
            for fd, _events in poller.poll(step * 1000.0):
                if fd == self._wake_r:
                    self._drain_wakeups()
                    return _STOP if self.check() is not None else _READY
                if fd != client_fd:
                    return _READY
            # A client fd event is confirmed (or not) by check() on the next
            # turn; a reused fd that the probe disowns is not spun on.

    def _drain_wakeups(self):
        self._woken = False
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    # -- cleanup ------------------------------------------------------------

    def add_cleanup(self, function, *args, **kwargs):
        """Run ``function(*args, **kwargs)`` once when the stream ends.

        Cleanups run last-added first, in the thread that ends the stream;
        ``guard.reason`` tells why it ended.
        """
        if not self._cleanups:
            self._cleanups = []
        self._cleanups.append((function, args, kwargs))

    def add_ending(self, function, *args, **kwargs):
        """Run ``function(*args, **kwargs)`` once when the stream ends, before
        any cleanup: where a transaction is committed or aborted, while the
        resources that cleanups close (an SQL session) are still open."""
        if not self._endings:
            self._endings = []
        self._endings.append((function, args, kwargs))

    def run_cleanups(self):
        """Run the endings, then the cleanups, once each.  An ending that
        raises ``StreamError`` turns the end into a failure (``reason``
        becomes ERROR): a commit that was refused, say."""
        for calls in (self._endings, self._cleanups):
            while calls:
                function, args, kwargs = calls.pop()
                try:
                    function(*args, **kwargs)
                except StreamError as error:
                    self.reason = EndReason.ERROR
                    logger.warning("a stream failed as it ended: %s", error)
                except Exception:
                    logger.exception("ending or cleanup %r of a stream failed", function)
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def explain(error):
    """A hint for the log line of a producer's exception, where one helps:
    a producer that touched the request's persistent objects (closed with
    the request's connection before the body runs) needs ``zodb=True``."""
    if type(error).__name__ == "ConnectionStateError":
        return (
            ": it used a persistent object of the request, whose database "
            "connection closed before the stream began; capture plain values in "
            "the view, or pass zodb=True and context= to stream_response() and "
            "use guard.zodb"
        )
    return ""


def _caller_frame():
    """The frame that called ``GuardedStream.__next__``, or None where a C
    server (uWSGI) iterates the body: there is no Python frame above."""
    try:
        return sys._getframe(2)
    except ValueError:
        return None


class GuardedStream:
    """A WSGI body iterable that runs a producer under a ``StreamGuard``.

    ``setup(guard)``, if given, runs in the serving thread just before the
    producer's first step (under Zope: after the request's transaction is
    over) and may add cleanups.  ``label``, ``user``, ``client`` and ``log`` are
    shown by status views and logged.  ``reserved``: the caller already
    took a stream slot with ``live_streams.reserve`` (``zodb``: with a
    ``zodb_limit``).  ``park``: how to park
    the stream while its producer waits in ``guard.idle()``
    (``waitress.park.park``); None: it holds its thread throughout.
    ``error_chunk``: the last bytes of a stream that fails (an SSE error
    event); text streams end without the chunked body's clean end instead.
    ``direct_output``: see ``_direct_output_for``.
    """

    def __init__(
        self,
        producer,
        guard,
        setup=None,
        label="",
        user="",
        client="",
        log="",
        user_key=None,
        encoding="utf-8",
        reserved=False,
        park=None,
        kind="held",
        zodb=False,
        error_chunk=None,
        direct_output=None,
    ):
        self.guard = guard
        #: ``direct_output(frame)``: how large chunks go straight onto the
        #: server's connection, given the frame that iterates us (waitress:
        #: ``waitress.output.DirectOutput.for_caller``), or None.
        self._direct_output_for = direct_output
        #: Sent as the last chunk when the stream fails (SSE: an ``error``
        #: event), before the connection is dropped without a clean end.
        self.error_chunk = error_chunk
        #: The producer's exception, re-raised to a server that is not
        #: told directly (``StreamFailed`` when there is none).
        self._failure = None
        #: When the server's thread started to iterate us (``HOLD_GRACE``).
        self._on_thread_since = None
        #: Counted against the thread cap for now (it was busy), until it parks.
        self._busy_held = False
        #: ``park(stream, frame)`` parks the stream (raising out of the
        #: server's loop) or returns when it cannot: ``waitress.park.park``.
        self._park_with = park
        guard.parkable = park is not None
        #: Set just before the stream parks: the server's ``close()`` on the
        #: way out of its loop must not end it.
        self._parking = False
        self._producer = producer
        self._iterator = None
        self._direct = None  # a DirectOutput, or False where there is none
        self._setup = setup
        self._encoding = encoding
        self._lock = threading.Lock()
        self._ended = False
        self.record = guard.live_streams.start(
            guard,
            label=label,
            user=user,
            client=client,
            log=log,
            user_key=user if user_key is None else user_key,
            probe=guard.connection.probe,
            reserved=reserved,
            kind=kind,
            zodb=zodb,
        )
        # A client that vanishes without FIN or reset is found by the
        # kernel within 50 s (connection.keep_alive): by keepalive probes,
        # or, for a stream that beats, by its heartbeats' user timeout.
        guard.connection.keep_alive(
            sends_every=guard.heartbeat_interval if guard.heartbeat is not None else None,
        )
        # Debug only: at INFO, a thousand viewers coming back after a restart
        # wrote a thousand lines, each waking every viewer of the event log,
        # and the line was 5 % of an opening's time (py-spy).  The end's line
        # says all this at INFO, once per stream.
        logger.debug(
            "stream %d started: %s user=%s client=%s probe=%s",
            self.record.id,
            label,
            user,
            client,
            guard.connection.probe,
        )

    def __del__(self):
        # Only for garbage collection (a body the publisher dropped): the
        # slot comes back and the cleanups run (LiveStreams.discard).  A
        # method, not a weakref.finalize: that is five more objects for the
        # collector to track for each of 10,000 parked streams.  Not at
        # interpreter exit: live_streams.shutdown() has ended live streams.
        if sys.is_finalizing():
            return
        try:
            live_streams, record = self.guard.live_streams, self.record
        except AttributeError:  # __init__ did not get that far
            return
        live_streams.discard(record)

    def __iter__(self):
        return self

    def __next__(self):
        first_call = self._direct is None and not self._ended
        if first_call:
            # Who iterates us: waitress itself, or anything else.  Asked
            # once, at the first step, from the caller's frame.
            if self._direct_output_for is not None:
                self._direct = self._direct_output_for(_caller_frame()) or False
            else:
                self._direct = False
            self._on_thread_since = time.monotonic()
            if self._direct:
                # Its headers go with the first chunk, in one send (below),
                # or before the stream first waits, parks or ends
                # (_flush_direct): a quiet stream's proxy sees them at once.
                self.guard.before_wait = self._flush_direct
        try:
            while True:
                chunk = self.step()
                if chunk is not PARK:
                    break
                # idle() asks to let the thread go: the stream parks (this
                # raises out of the server's loop), or it cannot and the
                # producer's idle() then waits in this thread, as it always did.
                self._park(_caller_frame())
        except StopIteration:
            if self.guard.reason is EndReason.ERROR:
                return self._fail()
            raise
        except Exception as error:
            # Logged and ended by step(); the client is told below.
            self._failure = error
            return self._fail()
        if self.guard.parkable and not self._busy_held and self.guard.parked is None:
            if time.monotonic() - self._on_thread_since > HOLD_GRACE:
                self._hold_busy()
        direct = self._direct
        if first_call and direct and not direct.headers_sent:
            # A small first chunk goes with the headers, in one send; a
            # large one after them, the direct way (no copy).  Past the
            # first call they are out: it sent them, or a wait or a park
            # did.
            if chunk and len(chunk) < DIRECT_MIN and direct.send_headers_with(chunk):
                return b""
            direct.send_headers()
        if len(chunk) >= DIRECT_MIN and direct:
            if direct.ready():
                direct.write(chunk, self._stopping, batch=self.guard.batch_output)
                self.record.bytes_direct += len(chunk)
                return b""
        # An ordinary chunk: what the direct output holds goes first.
        self._flush_direct(quiet=False)
        # A bytearray (a reused read buffer) goes out as bytes: WSGI servers
        # want bytes, and keep them after this call returns.
        return chunk if type(chunk) is bytes else bytes(chunk)

    def step(self):
        """The producer's next chunk (bytes, possibly empty, or ``PARK``);
        raises StopIteration once the stream has ended, or the producer's
        exception after ending it with ERROR.  What drives a parked
        stream calls this from any thread."""
        if self._ended:
            raise StopIteration
        reason = self.guard.check()
        if reason is EndReason.CLIENT_GONE and self.guard.catching_up:
            # A client that only shut down its sending side (``nc -N``, some
            # scripts) still reads: it gets what was there when it asked.
            # One that has really gone fails the write instead.
            reason = None
        if reason is not None:
            if reason is not EndReason.CLIENT_GONE:
                self._flush_direct()
            self._end(reason)
            raise StopIteration
        try:
            if self._iterator is None:
                self._iterator = self._start()
            chunk = next(self._iterator)
        except StopIteration:
            # What is still held goes before waitress ends the body; if the
            # client has gone, waitress closes us (CLIENT_GONE).
            self._flush_direct(quiet=False)
            # A producer that returns because its wait said "stop" did not
            # finish its work: end with the guard's reason, so that its
            # transaction is aborted rather than committed.
            self._end(self.guard.check() or EndReason.FINISHED)
            raise
        except StreamError as error:
            logger.warning("stream %d failed: %s", self.record.id, error)
            self._end(EndReason.ERROR)
            raise
        except Exception as error:
            # Exceptions in a body iterator get no Zope error view and no
            # error_log entry: log it here, with the stream it ended.
            hint = explain(error)
            if hint:
                # ZODB has just logged its traceback: say what to do instead.
                logger.error(
                    "stream %d failed: %s: %s%s", self.record.id, type(error).__name__, error, hint
                )
            else:
                logger.exception("stream %d failed", self.record.id)
            self._end(EndReason.ERROR)
            raise
        if chunk is PARK:
            return PARK
        if isinstance(chunk, str):
            chunk = chunk.encode(self._encoding)
        elif not isinstance(chunk, (bytes, bytearray)):
            chunk = bytes(chunk)
        if not chunk:
            return b""
        self.record.bytes_sent += len(chunk)
        self.guard.last_output = time.monotonic()
        return chunk

    def _park(self, frame):
        if self._park_with is not None:
            if self._busy_held:
                # It parks now, and holds a thread no more.
                self._busy_held = False
                self.guard.live_streams.unhold(self.record)
            try:
                # Raises waitress.park.LeaveWorker when the stream parks.
                self._park_with(self, frame)
            finally:
                frame = None
        # Cannot park here: never ask again, the producer waits in idle().
        self._park_with = None
        self.guard.hold()

    def prepare_park(self, parked):
        """The stream parks now (``parked``: its ``ParkedStream``), and its
        thread goes back to the server: what the direct output holds goes
        first, the thread's locals go back to what the next request there
        expects (``leave_step``), the thread cap's hook is dropped (a parked
        stream never holds a thread), and the server's ``close()`` on the
        way out of its loop will not end the stream."""
        self._flush_direct(quiet=True)
        self._direct = False
        guard = self.guard
        guard.before_wait = None
        guard.leave_step()
        guard.parked = parked
        guard.on_hold = None
        self._parking = True

    def _hold_busy(self):
        """The stream has kept its thread for HOLD_GRACE without parking:
        from now until it parks it counts against the thread cap, and ends
        (as failed) when no thread is left for it."""
        self._busy_held = True
        on_hold = self.guard.on_hold
        if on_hold is not None:
            on_hold(
                f"it has kept its thread for over {HOLD_GRACE:g} s without parking "
                "(a producer that works, or sleeps outside guard.idle())"
            )

    def _fail(self):
        """The stream has failed (its cleanups ran): send the error chunk, then
        end so that the client can tell (no clean end of the body)."""
        chunk, self.error_chunk = self.error_chunk, None
        if chunk:
            self._flush_direct(quiet=True)
            return chunk
        if self._direct:
            # One log line (ours): waitress is told directly, it logs nothing.
            self._direct.end_unfinished()
            raise StopIteration
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        raise StreamFailed(f"stream {self.record.id} failed (see the log above)")

    def _stopping(self):
        return self.guard.stopping

    def _flush_direct(self, quiet=True):
        """Queue what the direct output holds.  ``quiet``: a client that has
        gone is not an error here (the guard will see it)."""
        if self._direct:
            self._direct.flush(self._stopping, quiet=quiet)

    def _start(self):
        if self._setup is not None:
            self._setup(self.guard)
        producer = self._producer
        if callable(producer) and not hasattr(producer, "__iter__"):
            producer = producer(self.guard)
        return iter(producer)

    def close(self):
        """Called by the server when it stops iterating, also after a failed
        write to a client that left (waitress: ``ClientDisconnected``)."""
        if self._parking:
            self._parking = False
            return
        self._end(self.guard.check() or EndReason.CLIENT_GONE)

    def _end(self, reason):
        with self._lock:
            if self._ended:
                return
            self._ended = True
        guard = self.guard
        guard.reason = reason
        guard.before_wait = None  # no cycle guard -> stream once it ends
        try:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                # GeneratorExit at the producer's current yield: its own
                # finally/with blocks run now, in this thread.
                close()
            elif self._iterator is None and hasattr(self._producer, "close"):
                self._producer.close()
        except Exception:
            logger.exception("stream %d: the producer failed while stopping", self.record.id)
        finally:
            guard.run_cleanups()
            # An ending may have turned it into a failure (a refused commit).
            reason = guard.reason
            guard.live_streams.end(self.record, reason)
            record = self.record
            logger.info(
                "stream %d ended (%s): %d bytes (%d queued without a copy) in %.1f s: "
                "%s user=%s client=%s",
                record.id,
                reason.value,
                record.bytes_sent,
                record.bytes_direct,
                time.monotonic() - guard.started,
                record.label,
                record.user,
                record.client,
            )
