"""Parked streams: one thread per process watches every idle stream at once.

A stream whose producer waits in ``guard.idle()`` need not hold a server
worker thread while it waits.  Once the server has let go of its socket
(``waitress_park``), the stream is *parked* here: the hub thread watches,
with one epoll set, the client socket (EPOLLRDHUP/HUP/ERR: the client left;
EPOLLOUT: it reads again), the producer's readable fds, ``guard.wake()``
(through the hub's one eventfd) and a heap of timers (the idle timeout,
heartbeats, ``max_duration``).  When one fires, the stream is *resumed*: its
next steps run on a server worker (never on the hub) through a small,
bounded number of ``Runner`` tasks in the server's own queue, and their
output goes to the socket from a per-stream ``OutQueue`` that is sent
without blocking, by the worker when it can and by the hub on EPOLLOUT.
When the producer waits again the stream parks again.

The hub sends heartbeats itself, without resuming the producer: in
``idle()`` a heartbeat is the guard's fixed bytes, which the producer never
sees.  Only the hub closes a parked stream's socket, after it has left the
epoll set, so that no fd number can be reused under it.

Plain Python: imports nothing from Zope or waitress (the server's part,
``close_channel`` and ``add_task``, is handed in).  Linux only (epoll,
eventfd): elsewhere ``SUPPORTED`` is False and nothing parks.
"""

import collections
import errno
import heapq
import itertools
import logging
import os
import select
import threading
import time

logger = logging.getLogger("collective.streamguard")

SUPPORTED = hasattr(select, "epoll") and hasattr(os, "eventfd")

#: A running step stops once this much output waits for the client, and the
#: stream parks until the client has read it down to OUT_LOW: with a client
#: that does not read, a parked stream holds at most OUT_HIGH plus one
#: chunk (plus what the server held when it parked).
OUT_HIGH = 1 << 20
OUT_LOW = 256 << 10
#: A step gives the worker back after this much output or this long, so
#: that a stream catching up cannot keep a thread from normal pages.
STEP_BYTES = 4 << 20
SLICE = 0.02
#: Bytes per send(); the socket takes what it can.
SEND_SIZE = 256 << 10
#: Parts below this size (chunk framing) go with the next part, not as a
#: TCP segment of their own.
SMALL_PART = 64
#: How long an ended stream may take to send its last bytes before the
#: hub closes the socket anyway.
LINGER = 10.0
#: The longest epoll wait: also how often stale state is looked at.
TICK = 1.0

DISCONNECTED = frozenset(
    (errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED, errno.EPIPE)
)

# Socket events: the client left (RDHUP, HUP, ERR) or it can take more (OUT).
# Edge-triggered: EPOLLOUT is reported only after a send() found the buffer
# full, and EPOLLIN is never asked for (pipelined bytes must not wake us).
_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR if SUPPORTED else 0
_SOCKET_EVENTS = _GONE | select.EPOLLOUT | select.EPOLLET if SUPPORTED else 0
_READABLE_EVENTS = select.EPOLLIN | select.EPOLLONESHOT if SUPPORTED else 0

# States of a parked stream.  Every change happens under its lock.
DETACHING = "detaching"  # the server is letting go of the socket
PARKED = "parked"  # watched by the hub, no thread
QUEUED = "queued"  # a wake condition fired: waits for a runner
RUNNING = "running"  # a step runs on a worker
ENDING = "ending"  # ended: the last bytes go out, then the hub closes
CLOSED = "closed"

_READY, _TIMEOUT, _STOP = "ready", "timeout", "stop"  # as in guard


class OutQueue:
    """What waits to be sent on one socket: memoryviews and server buffers
    (anything with ``get``/``skip``/``close`` and ``len``), in order."""

    def __init__(self):
        self.parts = collections.deque()
        self.size = 0

    def __len__(self):
        return self.size

    def add(self, data):
        if len(data):
            self.parts.append(memoryview(data))
            self.size += len(data)

    def add_buffer(self, buffer):
        if len(buffer):
            self.parts.append(buffer)
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
        for part in self.parts:
            if type(part) is not memoryview:
                try:
                    part.close()
                except Exception:
                    logger.exception("closing a buffer of a parked stream failed")
        self.parts.clear()
        self.size = 0


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
        self.gone = False
        self.version = 0
        self.resumes = 0
        self.armed = ()
        self.linger_until = None
        self.registered = False  # the socket is in the hub's epoll set

    def __repr__(self):
        return f"<ParkedStream {self.body.record.id} fd={self.fd} {self.state}>"

    # -- any thread ---------------------------------------------------------

    def wake(self):
        """``guard.wake()`` of a parked stream: resume it (READY)."""
        self.resume(_READY)

    def resume(self, outcome, gone=False):
        """Queue the stream for a step if it is parked; True if it was."""
        with self.lock:
            if gone:
                self.gone = True
            if self.state is not PARKED:
                return False
            if outcome is _READY and not self.in_idle and self.out.size > OUT_HIGH:
                # Parked because the client does not read: a wake waits
                # (guard._woken stays set) until EPOLLOUT resumes us.
                return False
            self.state = QUEUED
            self.outcome = outcome
            self.version += 1
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
            if outcome is _READY:
                guard._woken = False
            guard._outcome = outcome
        ended, error = False, False
        produced = 0
        deadline = time.monotonic() + SLICE
        from collective.streamguard.guard import PARK

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
            ended = error = True  # logged and ended by the body (ERROR)
        finally:
            guard.leave_step()
        if ended:
            self._finish(error)
        else:
            self._pause()

    def _frame(self, chunk):
        # The bytes waitress' task.write() would send (its lock held).
        if self.chunked:
            self.out.add(b"%X\r\n" % len(chunk))
            self.out.add(chunk)
            self.out.add(b"\r\n")
        else:
            self.out.add(chunk)

    def _flush(self):
        """Send what is queued; False when the client has gone."""
        with self.lock:
            try:
                self.out.send(self.sock)
            except OSError:
                self.gone = True
                return False
        return True

    def _park_again(self):
        """The producer waits in idle() again: park, unless woken meanwhile."""
        guard = self.guard
        self._flush()
        with self.lock:
            if guard._woken or self.gone:
                guard._woken = False
                guard._outcome = _STOP if self.gone else _READY
                return False
            self.in_idle = True
            self.state = PARKED
            self.version += 1
            self.hub.arm(self, guard.park_readable)
            self.hub.post("timer", self, self.version)
        return True

    def _pause(self):
        """A step that stopped with output pending or its slice used up."""
        if self.state is not RUNNING:
            return  # parked again by _park_again
        self._flush()
        with self.lock:
            self.version += 1
            if self.out.size > OUT_HIGH and not self.gone:
                # The client does not read: the hub resumes us on EPOLLOUT
                # below OUT_LOW, and keeps the timers running.
                self.state = PARKED
                self.hub.post("timer", self, self.version)
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
        """The stream has ended (its cleanups ran): last bytes, then close."""
        reason = self.guard.reason
        from collective.streamguard.streams import EndReason

        with self.lock:
            self.state = ENDING
            if self.chunked and not error and reason is not EndReason.CLIENT_GONE:
                self.out.add(b"0\r\n\r\n")
            if reason is EndReason.CLIENT_GONE or self.gone:
                self.out.close()
            else:
                try:
                    self.out.send(self.sock)
                except OSError:
                    self.out.close()
        self.guard.parked = None
        self.hub.post("close", self, 0)

    def orphan(self):
        """The server closed the socket before it let go of it: end the
        stream on a worker, and leave the socket (not ours) alone."""
        with self.lock:
            self.close_channel = None
            self.gone = True
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


class Hub:
    """The one thread that watches every parked stream of this process."""

    def __init__(self):
        self.pid = os.getpid()
        self.epoll = select.epoll()
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll.register(self.eventfd, select.EPOLLIN)
        self.inbox = collections.deque()
        self.streams = {}  # socket fd -> ParkedStream (hub thread only)
        self._timers = []
        self._seq = itertools.count()
        self._readables = {}  # producer fd -> set of ParkedStream
        self._callbacks = {}  # fd -> callback, see watch_fd()
        self._fd_lock = threading.Lock()
        self._signalled = False
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="streamguard-hub", daemon=True)
        self.thread.start()

    # -- any thread ---------------------------------------------------------

    def post(self, what, stream, version):
        self.inbox.append((what, stream, version))
        if not self._signalled:
            self._signalled = True
            try:
                os.eventfd_write(self.eventfd, 1)
            except OSError:
                pass

    def adopt(self, stream, leftovers=()):
        """Take over a stream whose socket the server let go of."""
        for buffer in leftovers:
            stream.out.add_buffer(buffer)
        self.post("adopt", stream, 0)

    def arm(self, stream, readable):
        """Watch ``readable`` for ``stream`` (its lock held)."""
        fds = [fd for fd in readable if isinstance(fd, int) and fd >= 0]
        stream.armed = fds
        if not fds:
            return
        with self._fd_lock:
            for fd in fds:
                watchers = self._readables.setdefault(fd, set())
                watchers.add(stream)
                try:
                    try:
                        self.epoll.modify(fd, _READABLE_EVENTS)
                    except FileNotFoundError:
                        self.epoll.register(fd, _READABLE_EVENTS)
                except OSError:
                    # Closed under us: the idle timeout is the safety net.
                    logger.debug("cannot watch fd %d of %r", fd, stream, exc_info=True)

    def disarm(self, stream):
        """Stop watching the stream's readable fds (its lock held): done
        before the producer runs, so it may close them."""
        fds, stream.armed = stream.armed, ()
        if not fds:
            return
        with self._fd_lock:
            for fd in fds:
                watchers = self._readables.get(fd)
                if watchers is None:
                    continue
                watchers.discard(stream)
                if not watchers:
                    del self._readables[fd]
                    try:
                        self.epoll.unregister(fd)
                    except OSError:
                        pass

    def watch_fd(self, fd, callback):
        """Call ``callback()`` in the hub's thread whenever ``fd`` is
        readable (level-triggered: it must read what is there); for the
        process' shared inotify instance (``collective.streamguard.inotify``)."""
        self._callbacks[fd] = callback
        self.epoll.register(fd, select.EPOLLIN)

    def count(self):
        return len(self.streams)

    def stop(self, timeout=5.0):
        """End the hub's thread; close what it still holds."""
        self._stopping = True
        self.post("stop", None, 0)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # -- the hub thread -----------------------------------------------------

    def _run(self):
        try:
            while not self._stopping:
                self._loop_once()
        except Exception:
            logger.exception("the stream hub failed; parked streams are closed")
        finally:
            for stream in list(self.streams.values()):
                self._close(stream)
            self.epoll.close()
            os.close(self.eventfd)

    def _loop_once(self):
        timeout = TICK
        if self._timers:
            timeout = min(TICK, max(0.0, self._timers[0][0] - time.monotonic()))
        try:
            events = self.epoll.poll(timeout)
        except InterruptedError:
            events = ()
        for fd, mask in events:
            if fd == self.eventfd:
                self._signalled = False
                try:
                    os.eventfd_read(self.eventfd)
                except BlockingIOError:
                    pass
                continue
            stream = self.streams.get(fd)
            if stream is not None:
                self._socket_event(stream, mask)
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
            for stream in watchers:
                stream.resume(_READY)
        while self.inbox:
            what, stream, version = self.inbox.popleft()
            getattr(self, "_on_" + what)(stream, version)
        self._run_timers()

    def _socket_event(self, stream, mask):
        if mask & _GONE:
            stream.gone = True
            self._unregister(stream)
            if stream.state is ENDING:
                self._close(stream)
            else:
                stream.resume(_STOP, gone=True)
            return
        if mask & select.EPOLLOUT:
            self._send(stream)

    def _send(self, stream):
        with stream.lock:
            try:
                empty = stream.out.send(stream.sock)
            except OSError:
                stream.gone = True
                empty = False
            state, size = stream.state, stream.out.size
        if state is ENDING and (empty or stream.gone):
            self._close(stream)
        elif stream.gone:
            stream.resume(_STOP, gone=True)
        elif state is PARKED and not stream.in_idle and size <= OUT_LOW:
            stream.resume(None)  # the client reads again: go on producing

    def _on_stop(self, stream, version):
        self._stopping = True

    def _on_adopt(self, stream, version):
        try:
            self.epoll.register(stream.fd, _SOCKET_EVENTS)
            stream.registered = True
        except OSError:
            logger.exception("cannot watch the socket of %r", stream)
            stream.gone = True
        self.streams[stream.fd] = stream
        with stream.lock:
            stream.state = RUNNING  # what _park_again expects
        # Parked as the producer asked, unless something happened meanwhile
        # (the leftovers of the server go out first, EPOLLOUT if they wait).
        if not stream.gone and stream._park_again():
            if stream.guard.live_streams.shutting_down.is_set():
                stream.resume(_STOP)
            return
        with stream.lock:
            stream.outcome = _STOP if stream.gone else _READY
            stream.in_idle = True
            stream.state = QUEUED
        stream.scheduler.submit(stream)

    def _on_timer(self, stream, version):
        if version != stream.version or stream.state is not PARKED:
            return
        guard = stream.guard
        now = time.monotonic()
        when = None if not stream.in_idle else guard.park_deadline
        if guard.max_duration:
            end = guard.started + guard.max_duration
            when = end if when is None else min(when, end)
        if stream.in_idle and guard.heartbeat is not None:
            due = guard.last_output + guard.heartbeat_interval
            when = due if when is None else min(when, due)
        if when is not None:
            heapq.heappush(self._timers, (max(when, now), next(self._seq), stream, version))

    def _run_timers(self):
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _when, _seq, stream, version = heapq.heappop(timers)
            if version is _LINGER:
                if stream.state is ENDING:
                    self._close(stream)  # the client will not read its last bytes
                continue
            if version != stream.version or stream.state is not PARKED:
                continue
            guard = stream.guard
            if guard.max_duration and now >= guard.started + guard.max_duration:
                stream.resume(_STOP)
            elif stream.in_idle and guard.park_deadline is not None and now >= guard.park_deadline:
                stream.resume(_TIMEOUT)
            else:
                if stream.in_idle and guard.heartbeat is not None:
                    if now >= guard.last_output + guard.heartbeat_interval:
                        self._heartbeat(stream)
                self._on_timer(stream, version)

    def _heartbeat(self, stream):
        guard = stream.guard
        with stream.lock:
            if stream.state is not PARKED or stream.out.size:
                return  # output is pending anyway
            stream._frame(guard.heartbeat)
        guard.last_output = time.monotonic()
        stream.body.record.bytes_sent += len(guard.heartbeat)
        self._send(stream)

    def _unregister(self, stream):
        # Only while registered: the number may belong to another socket
        # once ours is closed.
        if stream.registered:
            stream.registered = False
            try:
                self.epoll.unregister(stream.fd)
            except OSError:
                pass

    def _on_close(self, stream, version):
        if stream.state is CLOSED:
            return
        if stream.gone or not stream.out.size:
            self._close(stream)
            return
        # Let the last bytes go out (EPOLLOUT), for LINGER at most.
        stream.linger_until = time.monotonic() + LINGER
        self._send(stream)
        if stream.state is not CLOSED:
            heapq.heappush(self._timers, (stream.linger_until, next(self._seq), stream, _LINGER))

    def _close(self, stream):
        if stream.state is CLOSED:
            return
        with stream.lock:
            stream.state = CLOSED
            stream.out.close()
            self.disarm(stream)
        if self.streams.get(stream.fd) is stream:
            del self.streams[stream.fd]
        self._unregister(stream)
        try:
            if stream.close_channel is not None:
                stream.close_channel()
        except Exception:
            logger.exception("closing the connection of %r failed", stream)
        if stream.state is not ENDING:
            # A stream the hub gives up on (stop()): its body ends too.
            stream.guard.parked = None


#: The version of a timer entry that closes an ended stream after LINGER.
_LINGER = -1


_hub = None
_hub_lock = threading.Lock()


def hub():
    """The hub of this process, started on first use (again after a fork)."""
    global _hub
    current = _hub
    if current is not None and current.pid == os.getpid() and current.thread.is_alive():
        return current
    with _hub_lock:
        if _hub is None or _hub.pid != os.getpid() or not _hub.thread.is_alive():
            _hub = Hub()
        return _hub


def stop_hub(timeout=5.0):
    """Stop the hub (tests, interpreter exit); the next use starts a new one."""
    global _hub
    with _hub_lock:
        current, _hub = _hub, None
    if current is not None and current.pid == os.getpid():
        current.stop(timeout)
