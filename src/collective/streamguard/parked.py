"""A parked stream: its state, its output, and the steps that resume it.

``ParkedStream`` is what the hub (``collective.streamguard.hub``) knows of one
stream whose server let go of its socket: its state (every change under its
lock), its ``OutQueue`` (sent without blocking, by the worker at the end of
a step and by the hub on EPOLLOUT), and ``run_step()``, which runs the
producer on a server worker until it waits again, ends, or has given
enough.  ``Scheduler`` keeps the ready streams of one server and a bounded
number of ``Runner`` tasks in the server's own task queue.

Plain Python: imports nothing from Zope or waitress.
"""

import collections
import logging
import threading
import time

from collective.streamguard.guard import PARK
from collective.streamguard.guard import READY
from collective.streamguard.guard import STOP
from collective.streamguard.streams import EndReason

logger = logging.getLogger("collective.streamguard")

#: A running step stops once this much output waits for the client, and the
#: stream parks until the client has read it down to OUT_LOW: with a client
#: that does not read, a parked stream holds at most OUT_HIGH plus one
#: chunk (plus what the server held when it parked).
OUT_HIGH = 256 << 10
OUT_LOW = 64 << 10
#: A step gives the worker back after this much output or this long, so
#: that a stream catching up cannot keep a thread from normal pages.
STEP_BYTES = 4 << 20
SLICE = 0.02
#: Bytes per send(); the socket takes what it can.
SEND_SIZE = 256 << 10
#: Parts below this size (chunk framing) go with the next part, not as a
#: TCP segment of their own.
SMALL_PART = 64
# States of a parked stream.  Every change happens under its lock.
DETACHING = "detaching"  # the server is letting go of the socket
ADOPTING = "adopting"  # it has: the hub is taking it over
PARKED = "parked"  # watched by the hub, no thread
QUEUED = "queued"  # a wake condition fired: waits for a runner
RUNNING = "running"  # a step runs on a worker
ENDING = "ending"  # ended: the last bytes go out, then the hub closes
CLOSED = "closed"


class OutQueue:
    """What waits to be sent on one socket: memoryviews and server buffers
    (anything with ``get``/``skip``/``close`` and ``len``), in order."""

    __slots__ = ("parts", "size")

    def __init__(self):
        # A deque only while there is output: an idle stream's queue is
        # empty, and an empty deque costs 760 bytes.
        self.parts = None
        self.size = 0

    def __len__(self):
        return self.size

    def _parts(self):
        if self.parts is None:
            self.parts = collections.deque()
        return self.parts

    def add(self, data):
        if len(data):
            self._parts().append(memoryview(data))
            self.size += len(data)

    def add_buffer(self, buffer):
        if len(buffer):
            self._parts().append(buffer)
            self.size += len(buffer)
        else:
            buffer.close()

    def send(self, sock):
        """Send without blocking; True once empty.  Raises OSError when the
        client has gone."""
        parts = self.parts
        while parts:
            head = parts[0]
            if type(head) is memoryview:
                data = head
                if len(head) < SMALL_PART and len(parts) > 1 and type(parts[1]) is memoryview:
                    data = b"".join((head, parts[1][:SEND_SIZE]))
            else:
                if not len(head):
                    parts.popleft().close()
                    continue
                data = head.get(SEND_SIZE)
                if not data:
                    return False  # a buffer that gives nothing to this thread
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                return False
            self._consume(sent)
            if sent < len(data):
                return False
        self.parts = None
        return True

    def _consume(self, count):
        self.size -= count
        parts = self.parts
        while count:
            head = parts[0]
            length = len(head)
            if count < length:
                if type(head) is memoryview:
                    parts[0] = head[count:]
                else:
                    head.skip(count, True)
                return
            count -= length
            parts.popleft()
            if type(head) is not memoryview:
                head.close()

    def close(self):
        parts, self.parts = self.parts, None
        for part in parts or ():
            if type(part) is not memoryview:
                try:
                    part.close()
                except Exception:
                    logger.exception("closing a buffer of a parked stream failed")
        self.size = 0


#: Chunks up to this size are copied into their chunk framing.
FRAMED_COPY = 16 << 10
_last_framed = (None, None)  # (chunk, framed): replaced whole, never mutated


def _set_last_framed(chunk, framed):
    global _last_framed
    _last_framed = (chunk, framed)


class ParkedStream:
    """One stream the server has let go of: its socket, output and state.

    ``body`` is the ``GuardedStream``; ``chunked``: frame the output for
    HTTP/1.1 chunked encoding (else the body ends with the connection);
    ``close_channel()`` is run by the hub, once, after the socket has left
    its epoll set; ``scheduler`` runs the steps.
    """

    def __init__(self, hub, scheduler, body, sock, chunked, close_channel):
        self.hub = hub
        self.scheduler = scheduler
        self.body = body
        self.guard = body.guard
        self.sock = sock
        self.fd = sock.fileno()
        self.chunked = chunked
        self.close_channel = close_channel
        self.lock = threading.Lock()
        self.state = DETACHING
        self.out = OutQueue()
        #: The producer waits in idle() (else: it was stopped because the
        #: client did not read, and just goes on when resumed).
        self.in_idle = True
        self.outcome = None
        #: The client left or half-closed: produce no more.
        self.gone = False
        #: Nothing more can be sent (a send failed, a reset).
        self.broken = False
        #: The time of this stream's live entry in the hub's timer heap, or
        #: None (``_want_timer``).
        self.timer_due = None
        self.timer_in_idle = False  # it counted the idle deadline and heartbeat
        self.resumes = 0
        self.armed = ()
        self.linger_until = None
        self.registered = False  # the socket is in the hub's epoll set

    def __repr__(self):
        return f"<ParkedStream {self.body.record.id} fd={self.fd} {self.state}>"

    # -- any thread ---------------------------------------------------------

    def wake(self):
        """``guard.wake()`` of a parked stream: resume it (READY)."""
        self.resume(READY)

    def resume(self, outcome, gone=False):
        """Queue the stream for a step if it is parked; True if it was."""
        with self.lock:
            if gone:
                self.gone = True
            if self.state is DETACHING and self.guard.live_streams.shutting_down.is_set():
                # Shutdown before the server's I/O thread let go of the
                # socket (it may never do so now: its loop is stopping).
                # The stream ends anyway and leaves the socket to the server.
                self.abandon()
                return True
            if self.state is not PARKED:
                return False
            if (
                outcome is READY
                and not self.in_idle
                and self.out.size > OUT_HIGH
                and not self.guard.live_streams.shutting_down.is_set()
            ):
                # Parked because the client does not read: a wake waits
                # (guard._woken stays set) until EPOLLOUT resumes us.
                return False
            self.state = QUEUED
            self.outcome = outcome
            self.hub.disarm(self)
        self.scheduler.submit(self)
        return True

    # -- the thread that runs a step ------------------------------------------

    def run_step(self):
        """Run the producer until it waits again, ends, or has given enough;
        never raises."""
        with self.lock:
            if self.state is not QUEUED:
                return
            self.state = RUNNING
            outcome, self.outcome = self.outcome, None
            in_idle, self.in_idle = self.in_idle, False
        guard, body = self.guard, self.body
        self.resumes += 1
        if in_idle:
            if outcome is READY:
                guard._woken = False
            guard._outcome = outcome
        ended = False
        produced = 0
        deadline = time.monotonic() + SLICE
        guard.enter_step()
        try:
            while True:
                if self.gone:
                    # The hub saw the client leave, or a send failed.
                    body.close()
                    ended = True
                    break
                chunk = body.step()
                if chunk is PARK:
                    if self._park_again():
                        break
                    continue  # woken meanwhile: go on at once
                if chunk:
                    produced += len(chunk)
                    with self.lock:
                        self._frame(chunk)
                    if self.out.size > OUT_HIGH:
                        self._flush()
                        if self.gone:
                            continue
                        if self.out.size > OUT_HIGH:
                            break  # the client does not read: park (_pause)
                    if produced > STEP_BYTES or time.monotonic() >= deadline:
                        break
        except StopIteration:
            ended = True
        except Exception:
            ended = True  # logged and ended by the body (ERROR)
        finally:
            guard.leave_step()
        if ended:
            # Failed: the producer raised, or the stream was stopped as
            # failed (its commit refused, say).
            self._finish(error=guard.reason is EndReason.ERROR)
        else:
            self._pause()

    def _frame(self, chunk):
        # The bytes waitress' task.write() would send (its lock held).
        if self.chunked and len(chunk) > FRAMED_COPY:
            self.out.add(b"%X\r\n" % len(chunk))
            self.out.add(chunk)
            self.out.add(b"\r\n")
        else:
            self.out.add(self.framed(chunk))

    def framed(self, chunk):
        """A small chunk as waitress frames it, as one bytes object."""
        if not self.chunked:
            return chunk
        # In a fan-out every stream of a path yields the same chunk object
        # (the followers share their pieces and events), and every SSE
        # stream beats with the same heartbeat: the frame is made once
        # and shared too.
        last = _last_framed
        if last[0] is chunk:
            return last[1]
        framed = b"%X\r\n%s\r\n" % (len(chunk), chunk)
        _set_last_framed(chunk, framed)
        return framed

    def _flush(self):
        """Send what is queued; False when the client has gone."""
        with self.lock:
            try:
                self.out.send(self.sock)
            except OSError:
                self.gone = self.broken = True
                return False
        return True

    def _park_again(self):
        """The producer waits in idle() again: park, unless woken meanwhile."""
        guard = self.guard
        self._flush()
        with self.lock:
            if guard._woken or self.gone:
                guard._woken = False
                guard._outcome = STOP if self.gone else READY
                return False
            self.in_idle = True
            self.state = PARKED
            self.hub.arm(self, guard.park_readable)
            self._want_timer()
        return True

    def next_due(self):
        """When the hub must look at this parked stream again: its idle
        deadline, its next heartbeat or the end of ``max_duration``; None
        for never."""
        guard = self.guard
        when = guard.park_deadline if self.in_idle else None
        if guard.max_duration:
            end = guard.started + guard.max_duration
            when = end if when is None else min(when, end)
        if self.in_idle and guard.heartbeat is not None:
            due = guard.last_output + guard.heartbeat_interval
            when = due if when is None else min(when, due)
        return when

    def _want_timer(self, push=None):
        # Our lock held.  A live entry that is not later will do: deadlines
        # only move later as the stream sends, and when it comes due the
        # hub looks and pushes the real one.  So a fan-out that resumes
        # every stream costs the hub no timer per stream.
        if self.timer_due is not None and self.in_idle and self.timer_in_idle:
            # The heartbeat and max_duration cannot come before the live
            # entry now (last_output only grows); only a shorter idle
            # timeout can.
            deadline = self.guard.park_deadline
            if deadline is None or deadline >= self.timer_due:
                return
        due = self.next_due()
        if due is not None and (self.timer_due is None or due < self.timer_due):
            self.timer_due, self.timer_in_idle = due, self.in_idle
            if push is not None:
                push(self, due)  # the hub's own thread: straight into its heap
            else:
                self.hub.post("timer", self, due)

    def _pause(self):
        """A step that stopped with output pending or its slice used up."""
        if self.state is not RUNNING:
            return  # parked again by _park_again
        self._flush()
        with self.lock:
            if self.out.size > OUT_HIGH and not self.gone:
                # The client does not read: the hub resumes us on EPOLLOUT
                # below OUT_LOW, and keeps the timers running.
                self.state = PARKED
                self._want_timer()
                return
            self.state = QUEUED
        self.scheduler.submit(self)

    def _resume_gone(self):
        with self.lock:
            if self.state is not RUNNING:
                return
            self.state = QUEUED
            self.gone = True
        self.scheduler.submit(self)

    def _finish(self, error):
        """The stream has ended (its cleanups ran): last bytes, then close.

        As waitress ends a body: the terminating chunk after every end but
        an error, and what is queued goes out while the socket takes it (a
        client that only half-closed still reads it)."""
        with self.lock:
            self.state = ENDING
            if error and self.body.error_chunk:
                self._frame(self.body.error_chunk)
            if self.chunked and not error:
                self.out.add(b"0\r\n\r\n")
            if not self.broken:
                try:
                    self.out.send(self.sock)
                except OSError:
                    self.broken = True
            if self.broken:
                self.out.close()
        self.guard.parked = None
        self.hub.post("close", self, 0)

    def abandon(self):
        """End the stream without its socket, which stays the server's (our
        lock held): ``waitress_park._detach`` then closes the channel."""
        self.close_channel = None
        self.gone = self.broken = True
        self.state = QUEUED
        self.outcome = STOP
        self.scheduler.submit(self)

    def orphan(self):
        """The server closed the socket before it let go of it: end the
        stream on a worker, and leave the socket (not ours) alone."""
        with self.lock:
            if self.state is not ADOPTING:
                return  # abandoned at shutdown meanwhile
            self.close_channel = None
            self.gone = self.broken = True
            self.state = QUEUED
        self.scheduler.submit(self)

    def end_now(self):
        """At shutdown, or when a runner was cancelled: end the stream in
        this thread (the body's ``_end`` runs once whatever calls it)."""
        with self.lock:
            if self.state in (ENDING, CLOSED):
                return
            self.state = QUEUED
        self.run_step()


class Runner:
    """What goes into the server's task queue: runs ready streams' steps for
    one SLICE, then gives the worker back (and queues itself again, at the
    tail, if streams are still ready)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def __repr__(self):
        return f"<collective.streamguard step runner, {len(self.scheduler.ready)} ready>"

    def service(self):
        end = time.monotonic() + SLICE
        try:
            while time.monotonic() < end:
                stream = self.scheduler.pop_ready()
                if stream is None:
                    break
                try:
                    stream.run_step()
                except Exception:  # pragma: no cover (run_step catches all)
                    logger.exception("a step of %r failed", stream)
        finally:
            self.scheduler.runner_done()

    def cancel(self):
        # waitress' shutdown, its lock held: no add_task here.
        self.scheduler.cancelled()


class Scheduler:
    """The ready streams of one server and at most ``max_runners`` runners
    in its queue (one thread always stays for normal pages)."""

    def __init__(self, add_task, max_runners, shutting_down):
        self.add_task = add_task
        self.dispatcher = None  # what add_task feeds, for whoever made us
        self.max_runners = max(1, max_runners)
        self.shutting_down = shutting_down
        self.ready = collections.deque()
        self.running = 0
        self._lock = threading.Lock()
        self._ender = None

    def submit(self, stream):
        self.ready.append(stream)
        if self.shutting_down.is_set():
            self._end_in_thread()
            return
        with self._lock:
            start = self.running < self.max_runners
            if start:
                self.running += 1
        if start:
            self.add_task(Runner(self))

    def pop_ready(self):
        try:
            return self.ready.popleft()
        except IndexError:
            return None

    def runner_done(self):
        with self._lock:
            self.running -= 1
            again = bool(self.ready) and self.running < self.max_runners
            if again:
                self.running += 1
        if again:
            if self.shutting_down.is_set():
                with self._lock:
                    self.running -= 1
                self._end_in_thread()
            else:
                self.add_task(Runner(self))

    def cancelled(self):
        with self._lock:
            self.running -= 1
        self._end_in_thread()

    def _end_in_thread(self):
        # Shutdown: the server's workers are stopping, so ready streams end
        # in a thread of their own (never the hub's).
        with self._lock:
            if self._ender is not None and self._ender.is_alive():
                return
            self._ender = threading.Thread(
                target=self._drain, name="streamguard-ending", daemon=True
            )
            self._ender.start()

    def _drain(self):
        while True:
            stream = self.pop_ready()
            if stream is None:
                with self._lock:
                    self._ender = None
                if self.ready:  # raced with a submit
                    self._end_in_thread()
                return
            try:
                stream.end_now()
            except Exception:
                logger.exception("ending %r at shutdown failed", stream)
