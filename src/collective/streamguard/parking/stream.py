"""A parked stream: its socket, its output, its state and its steps.

``ParkedStream`` is one stream whose server let go of its socket.  The hub
(``collective.streamguard.hub``) watches that socket and its timers for it
and calls it back in the hub's thread (``on_socket_event``, ``on_readable``,
``on_timer``); a wake condition *resumes* it (``resume``): its next steps
run on a server worker through the ``Scheduler`` (``run_step``), never on
the hub, until the producer waits in ``guard.idle()`` again and the stream
parks again.  Its output waits in an ``OutQueue`` that is sent without
blocking, by the worker at the end of a step and by the hub on EPOLLOUT.
The hub sends heartbeats itself, without resuming the producer: in
``idle()`` a heartbeat is the guard's fixed bytes, which the producer never
sees.  Only the hub closes a parked stream's socket, after it has left the
epoll set, so that no fd number can be reused under it.

The guard and the stream talk through the guard's park protocol:
``guard.idle()`` yields ``PARK`` with ``guard.park_deadline`` and
``guard.park_readable`` set; a parked ``idle()`` returns what
``guard.resume(outcome)`` handed it; ``guard.woken`` says whether
``guard.wake()`` came meanwhile.

Plain Python: imports nothing from Zope or waitress (the server's part,
``close_channel`` and the scheduler's ``add_task``, is handed in).
"""

import logging
import select
import threading
import time

from collective.streamguard.guard import PARK
from collective.streamguard.guard import READY
from collective.streamguard.guard import STOP
from collective.streamguard.guard import TIMEOUT
from collective.streamguard.parking.output import OutQueue
from collective.streamguard.parking.output import frame
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
#: How long an ended stream may take to send its last bytes before the
#: hub closes the socket anyway.
LINGER = 10.0

# States of a parked stream.  Every change happens under its lock.
DETACHING = "detaching"  # the server is letting go of the socket
ADOPTING = "adopting"  # it has: the hub is taking it over
PARKED = "parked"  # watched by the hub, no thread
QUEUED = "queued"  # a wake condition fired: waits for a runner
RUNNING = "running"  # a step runs on a worker
ENDING = "ending"  # ended: the last bytes go out, then the hub closes
CLOSED = "closed"

_RESET = select.EPOLLHUP | select.EPOLLERR if hasattr(select, "EPOLLHUP") else 0
_HALF_CLOSE = getattr(select, "EPOLLRDHUP", 0)
_WRITABLE = getattr(select, "EPOLLOUT", 0)


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
        #: The time of this stream's live entry in the hub's timers, or None
        #: (``_want_timer``).
        self.timer_due = None
        self.timer_in_idle = False  # it counted the idle deadline and heartbeat
        self.resumes = 0
        #: Wakes served in the hub without a step: by the producer's
        #: wake_step, or by ``send_shared``.
        self.wake_steps = 0
        #: Of those, the ones served by ``send_shared``.
        self.shared_sends = 0
        self.armed = ()
        self.registered = False  # the socket is in the hub's epoll set
        #: The ``ParkedGroup`` this stream waits in, and what it joined
        #: with; what the group sent up to the last settling (bytes, sends).
        self.group = None
        self.group_item = None
        self.group_marks = (0, 0)

    def __repr__(self):
        return f"<ParkedStream {self.body.record.id} fd={self.fd} {self.state}>"

    # -- any thread ---------------------------------------------------------

    @property
    def queued_bytes(self):
        """Bytes waiting for the client (framing included)."""
        return self.out.size

    def adopt(self, leftovers=()):
        """The server has let go of the socket (its I/O thread): the hub
        takes the stream over, with what the server had not sent yet."""
        for buffer in leftovers:
            self.out.add_buffer(buffer)
        self.hub.call_soon(self._on_adopt)

    def wake(self):
        """``guard.wake()`` of a parked stream: resume it (READY), or, in
        the hub's thread, send what the producer's ``wake_step`` gives
        (``guard.idle(wake_step=...)``) and stay parked."""
        if self.guard.park_wake_step is not None and self.hub.in_thread() and self._run_wake_step():
            return
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
                # (guard.woken stays set) until EPOLLOUT resumes us.
                return False
            self._leave_group()
            self.state = QUEUED
            self.outcome = outcome
            self._disarm()
        self.scheduler.submit(self)
        return True

    def abandon(self):
        """End the stream without its socket, which stays the server's (our
        lock held): the server's part then closes the channel."""
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

    def adopting(self):
        """The server's I/O thread is letting go of the socket now: True
        unless the stream was abandoned meanwhile (our lock held)."""
        if self.state is not DETACHING:
            return False
        self.state = ADOPTING
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
            guard.resume(outcome)
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
                        self.out.add_chunk(chunk, self.chunked)
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

    def end_now(self):
        """At shutdown, or when a runner was cancelled: end the stream in
        this thread (the body ends once whatever calls it)."""
        with self.lock:
            if self.state in (ENDING, CLOSED):
                return
            self._leave_group()
            self.state = QUEUED
        self.run_step()

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
            if guard.woken or self.gone:
                guard.resume(STOP if self.gone else READY)
                return False
            self.in_idle = True
            self.state = PARKED
            self.armed = [fd for fd in guard.park_readable if isinstance(fd, int) and fd >= 0]
            if self.armed:
                self.hub.arm(self.armed, self)
            self._want_timer()
        return True

    def _disarm(self):
        # Our lock held; before the producer runs, so that it may close them.
        armed, self.armed = self.armed, ()
        if armed:
            self.hub.disarm(armed, self)

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

    def _want_timer(self):
        # Our lock held.  A live entry that is not later will do: deadlines
        # only move later as the stream sends, and when it comes due the
        # stream looks and asks for the real one.  So a fan-out that resumes
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
            self.hub.call_at(due, self.on_timer, due)

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

    def _finish(self, error):
        """The stream has ended (its cleanups ran): last bytes, then close.

        As waitress ends a body: the terminating chunk after every end but
        an error (then the body's error chunk, an SSE error event), and what
        is queued goes out while the socket takes it (a client that only
        half-closed still reads it)."""
        with self.lock:
            self.state = ENDING
            if error and self.body.error_chunk:
                self.out.add_chunk(self.body.error_chunk, self.chunked)
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
        self.hub.call_soon(self._on_ended)

    # -- the hub's thread ---------------------------------------------------

    def _on_adopt(self):
        self.registered = self.hub.register(self.fd, self)
        if not self.registered:
            self.gone = True
        with self.lock:
            self.state = RUNNING  # what _park_again expects (was ADOPTING)
        # Parked as the producer asked, unless something happened meanwhile
        # (the leftovers of the server go out first, EPOLLOUT if they wait).
        if not self.gone and self._park_again():
            if self.guard.live_streams.shutting_down.is_set():
                self.resume(STOP)
            return
        with self.lock:
            self.outcome = STOP if self.gone else READY
            self.in_idle = True
            self.state = QUEUED
        self.scheduler.submit(self)

    def _wakes_served_here(self):
        """Our lock held: the producer waits in ``idle()``, nothing is
        queued and nothing ends the stream, so a wake may be served in the
        hub without a step."""
        return (
            self.state is PARKED
            and self.in_idle
            and not self.gone
            and not self.out.size
            and self.guard.check() is None
        )

    def _shared_answer_served_here(self):
        """Our lock held: as ``_wakes_served_here``, with a wake step and no
        wake waiting (a helper's answer for many streams is then theirs):
        ``send_shared`` and ``join_group``."""
        guard = self.guard
        return guard.park_wake_step is not None and not guard.woken and self._wakes_served_here()

    def _run_wake_step(self):
        """A wake in the hub's thread: the producer's ``wake_step`` gives
        what it would send before it waits again, and the stream stays
        parked; False when it cannot (the caller resumes the stream).

        Why: one new line of a log followed by 10,000 parked viewers was
        10,000 steps on waitress' workers (resume, queue, the producer's
        generator and the guard, park again): 3.5x the time an asyncio
        server takes to send the same event (benchmarks/README.rst, fan-out).
        Here it is one read and one event, shared, then a send() per viewer
        in one thread, as asyncio does."""
        guard = self.guard
        with self.lock:
            self._leave_group()  # its producer reads on from the group's state
            if not self._wakes_served_here():
                return False  # ending, or output waits: the step decides
            guard.take_wake()
            try:
                chunks = guard.park_wake_step()
            except Exception:
                logger.exception("the wake step of %r failed", self)
                chunks = None
            if chunks is None:
                return False
            self.wake_steps += 1
            size = 0
            if len(chunks) == 1:
                # The usual case: one event, its frame shared by all.
                size = len(chunks[0])
                if size:
                    self._send_now(frame(chunks[0]) if self.chunked else chunks[0])
            else:
                for chunk in chunks:
                    size += len(chunk)
                    self.out.add_chunk(chunk, self.chunked)
                if size:
                    try:
                        self.out.send(self.sock)
                    except OSError:
                        self.gone = self.broken = True
        if size:
            self._sent_from_hub(size, time.monotonic())
        elif self.gone:
            self.resume(STOP, gone=True)
        return True

    def send_shared(self, chunk, advance, args):
        """``guard.send_parked``: while the producer waits in ``idle()`` with
        a ``wake_step`` and nothing is pending, run ``advance(*args)`` and
        send ``chunk`` (bytes, or None for nothing), both under the
        stream's lock (no step can run meanwhile), and stay parked; False,
        having done nothing, when the stream is in any other state.

        The hub's thread.  Why: ``_run_wake_step`` for each of 10,000
        followers of one log was 6-8 us of Python per viewer around a send
        of 11-13 us (benchmarks/bench_fanout_python.py); a fan-out whose
        followers are in one state reads once and sends each this way."""
        with self.lock:
            self._leave_group()
            if not self._shared_answer_served_here():
                return False
            advance(*args)
            self.wake_steps += 1
            self.shared_sends += 1
            if chunk:
                self._send_now(frame(chunk) if self.chunked else chunk)
        if chunk:
            self._sent_from_hub(len(chunk), time.monotonic())
        return True

    # -- parked groups (parking.group) ----------------------------------------

    def join_group(self, group, item):
        """Wait in ``group`` (``guard.join_parked_group``): True if the
        stream now does, False if it cannot (it is not parked in ``idle()``
        with a ``wake_step`` and nothing pending, or ``group.admit`` says
        no).  Until it leaves, the group sends it what it sends all."""
        with self.lock:
            if self.group is not None:
                return self.group is group
            if not self._shared_answer_served_here():
                return False
            with group.lock:
                if not group.admit(item, group.token):
                    return False
                group.add(self)
                self.group_marks = (group.bytes_sent, group.sends)
            self.group, self.group_item = group, item
        return True

    def leave_group(self):
        """Leave the group, if any: its producer takes the group's state.
        What it had joined with, or None when it was in no group."""
        with self.lock:
            return self._leave_group()

    def leave_group_after_send(self):
        """The group's last send did not all go (``ParkedGroup.send``): the
        rest waits in our queue, or the client has gone (hub thread)."""
        with self.lock:
            self._leave_group()
            gone = self.gone
        if gone:
            self.resume(STOP, gone=True)

    def settle_group(self):
        """Count what the group sent us so far (bytes, sends, the time of
        the last output) without leaving it."""
        with self.lock:
            self._settle_group()

    def _settle_group(self):
        # Our lock held.
        group = self.group
        if group is not None:
            with group.lock:
                totals = (group.bytes_sent, group.sends, group.last_output)
            self._settle(*totals)

    def _leave_group(self):
        # Our lock held: before anything else reads our queue, counters or
        # producer.  The group's lock second (the group's send holds it).
        group = self.group
        if group is None:
            return None
        with group.lock:
            rest, failed = group.remove(self)
            token = group.token
            totals = (group.bytes_sent, group.sends, group.last_output)
        item, self.group, self.group_item = self.group_item, None, None
        if rest is not None:
            self.out.add(rest)
        if failed:
            self.gone = self.broken = True
        self._settle(*totals)
        group.restore(item, token)
        return item

    def _settle(self, bytes_sent, sends, last_output):
        # Our lock held: what the group sent since the last settling.
        bytes_before, sends_before = self.group_marks
        self.group_marks = (bytes_sent, sends)
        if sends != sends_before:
            self.wake_steps += sends - sends_before
            self.shared_sends += sends - sends_before
        if bytes_sent != bytes_before:
            self.body.record.bytes_sent += bytes_sent - bytes_before
            if last_output > self.guard.last_output:
                self.guard.last_output = last_output

    def on_socket_event(self, mask):
        """The hub saw the client leave (RDHUP, HUP, ERR) or read (OUT)."""
        if mask & _RESET:
            # Reset, or both sides shut: nothing more can be sent.
            self.gone = self.broken = True
            self._unregister()
            if self.state is ENDING:
                self.close()
            else:
                self.resume(STOP, gone=True)
            return
        if mask & _HALF_CLOSE:
            # The client shut its side (a FIN, or a half close that still
            # reads): the stream ends, what is queued still goes out.
            self.gone = True
            self.resume(STOP, gone=True)
        if mask & _WRITABLE or self.state is ENDING:
            self.send_pending()

    def on_readable(self):
        """One of the producer's fds (``guard.idle(readable=...)``) is readable."""
        self.resume(READY)

    def send_pending(self):
        """Send what the queue holds, as the socket takes it (hub thread)."""
        with self.lock:
            try:
                empty = self.out.send(self.sock)
            except OSError:
                self.gone = self.broken = True
                empty = False
            state, size = self.state, self.out.size
        if state is ENDING and (empty or self.broken):
            self.close()
        elif self.gone:
            self.resume(STOP, gone=True)
        elif state is PARKED and not self.in_idle and size <= OUT_LOW:
            self.resume(None)  # the client reads again: go on producing

    def on_timer(self, due):
        """A timer this stream asked for came due: its idle timeout, the end
        of ``max_duration``, or a heartbeat."""
        now = time.monotonic()
        with self.lock:
            if self.timer_due != due:
                return  # an earlier entry replaced this one
            self.timer_due = None
            if self.state is not PARKED:
                return  # it asks again when it parks
            if self.group is not None:
                # The group's sends count as output: no heartbeat after them.
                self._settle_group()
        guard = self.guard
        if guard.max_duration and now >= guard.started + guard.max_duration:
            self.resume(STOP)
            return
        if self.in_idle and guard.park_deadline is not None and now >= guard.park_deadline:
            self.resume(TIMEOUT)
            return
        if self.in_idle and guard.heartbeat is not None:
            if now >= guard.last_output + guard.heartbeat_interval:
                self._heartbeat(now)
        with self.lock:
            if self.state is PARKED:
                self._want_timer()

    def _heartbeat(self, now):
        guard = self.guard
        with self.lock:
            if self.state is not PARKED or self.out.size:
                return  # output is pending anyway
            # Thousands of streams beat every 15 s: one send() each.
            self._send_now(frame(guard.heartbeat) if self.chunked else guard.heartbeat)
        self._sent_from_hub(len(guard.heartbeat), now)

    def _sent_from_hub(self, size, now):
        """After ``size`` bytes went out from the hub (no step): the time
        of the last output (heartbeats count from it), the stream's bytes,
        and its end if the send found the client gone."""
        self.guard.last_output = now
        self.body.record.bytes_sent += size
        if self.gone:
            self.resume(STOP, gone=True)

    def _send_now(self, data):
        """Send ``data`` at once, without the queue (our lock held, nothing
        queued): one send() of a frame many streams share; what the socket
        does not take waits in the queue for EPOLLOUT."""
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.gone = self.broken = True
            return
        if sent < len(data):
            # Queued: a group may not send past it (a grouped stream's
            # heartbeat comes here).
            self._leave_group()
            self.out.add(memoryview(data)[sent:])

    def _on_ended(self):
        if self.state is CLOSED:
            return
        if self.broken or not self.out.size:
            self.close()
            return
        # Let the last bytes go out (EPOLLOUT), for LINGER at most.
        self.send_pending()
        if self.state is not CLOSED:
            self.hub.call_at(time.monotonic() + LINGER, self._linger_over)

    def _linger_over(self):
        if self.state is ENDING:
            self.close()  # the client will not read its last bytes

    def _unregister(self):
        # Only while registered: the number may belong to another socket
        # once ours is closed.
        if self.registered:
            self.registered = False
            self.hub.unregister(self.fd, self)

    def close(self):
        """Close the stream's socket and channel (hub thread), once."""
        if self.state is CLOSED:
            return
        with self.lock:
            self._leave_group()
            self.state = CLOSED
            self.out.close()
            self._disarm()
        self._unregister()
        try:
            if self.close_channel is not None:
                self.close_channel()
        except Exception:
            logger.exception("closing the connection of %r failed", self)
        # A stream the hub gives up on (it stops) ends its body too.
        self.guard.parked = None
