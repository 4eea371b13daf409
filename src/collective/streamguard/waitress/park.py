"""Parking a waitress stream: the worker lets go, the hub takes the socket.

When a stream's producer waits in ``guard.idle()`` and every exactness
condition holds (``parkable``), ``park()`` raises the private ``LeaveWorker`` out
of waitress' ``WSGITask.execute``.  Nothing of waitress' end-of-request code
runs (it is a BaseException, not an Exception, and ``Task.service`` only
catches OSError): ``ParkingChannel.service`` catches it, the worker returns
to waitress' pool, and a trigger thunk, in the I/O thread, takes what the
channel still had to send and removes the channel from waitress' map
(``del_channel``: the socket stays open).  From then on waitress never
touches that socket; ``hub`` watches it, runs the producer's next steps on
waitress' workers (``parking.scheduler.Runner`` tasks in waitress' own queue) and writes
its output with the framing waitress would have used.

The conditions, all checked at the first park (otherwise the stream holds
its thread as it always did): waitress 3.0 (``waitress.output.SUPPORTED``);
waitress' own ``WSGITask.execute`` iterates the body (the calling frame: no
middleware in between could see or change the bytes); the channel is a
``ParkingChannel`` now inside its ``service()`` on this thread; the headers
are out or can be sent now; the body is chunked or runs to the close (no
Content-Length); the hub exists (Linux); not shutting down; and, where
waitress' loop uses ``select()`` (``asyncore_use_poll`` false), the socket's
fd is below SELECT_SAFE_FD: ``select()`` raises ValueError for fds from
1024 on and waitress' loop dies of it, so parked sockets must not push new
connections' fds up there.

``install(server)`` makes the server accept ``ParkingChannel``s, in its I/O
thread; the channels it already has are switched too (same layout), and
its task queue lets pages pass stream openings (``admission``).  With
``asyncore_use_poll`` it also raises the open-files limit to the hard limit.
Written against waitress 3.0.2: never call ``write_soon``, ``task.write``
or ``task.finish`` on a detached channel (above the high watermark they wait
on a condition nobody notifies any more).
"""

import errno
import functools
import logging
import threading
import time

from collective.streamguard import hub as hubs
from collective.streamguard.parking.scheduler import Scheduler
from collective.streamguard.parking.stream import ParkedStream
from collective.streamguard.waitress import admission
from collective.streamguard.waitress.channel import channel_of
from collective.streamguard.waitress.channel import task_of
from collective.streamguard.waitress.output import SUPPORTED

logger = logging.getLogger("collective.streamguard")

try:
    from waitress.channel import HTTPChannel
    from waitress.server import BaseWSGIServer
    from waitress.task import ThreadedTaskDispatcher
    from waitress.task import WSGITask
except ImportError:  # no waitress: nothing here is used
    HTTPChannel, WSGITask, BaseWSGIServer = object, None, None
    ThreadedTaskDispatcher = None

#: Without ``asyncore_use_poll`` parked sockets keep their fds below this,
#: leaving room under select()'s 1024 for the server's own connections.
SELECT_SAFE_FD = 900


class LeaveWorker(BaseException):
    """Private: carries a worker out of ``WSGITask.execute``, body unfinished."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream


class ParkingChannel(HTTPChannel):
    """waitress' channel, whose request may leave its worker mid-body."""

    #: The thread inside ``service()``, else None.  A class default, no
    #: ``__init__``: a live HTTPChannel can take this class (``install``).
    _servicing = None

    #: True when writable() answered False to a wake because a worker held
    #: the output lock; that worker's write_soon() then wakes the loop.
    _wake_refused = False

    def writable(self):
        # While a worker holds the output lock (inside write_soon(), sending
        # or waiting for the GIL after its send), waitress' handle_write
        # cannot flush (_flush_some_if_lockable gives up), yet the socket is
        # writable: poll() returns at once and the I/O loop spins, calling
        # readable() and writable() on every channel of the map each time.
        # Under a burst of arrivals that spin took the GIL from the very
        # worker it waited for: 500,000 loop passes over ~500 channels for
        # 1,000 stream opens, 40-70 s instead of 2-3 s
        # (benchmarks/bench_arrivals.py).
        # The loop asks every channel of its map at every pass: nothing to
        # send is answered first, without the lock or super() (waitress'
        # own answer then).
        if not self.total_outbufs_len:
            return self.will_close or self.close_when_flushed
        if self.requests and not (self.will_close or self.close_when_flushed):
            if not self.outbuf_lock.acquire(False):
                self._wake_refused = True
                return False
            self.outbuf_lock.release()
        return True

    def write_soon(self, data):
        try:
            return super().write_soon(data)
        finally:
            # waitress pulls the trigger inside the lock, where writable()
            # may have refused that wake.  Now the lock is free.
            if self._wake_refused:
                self._wake_refused = False
                if self.total_outbufs_len and self.connected:
                    self.server.pull_trigger()

    def received(self, data):
        handled = super().received(data)
        # A channel whose request waits for a worker has nothing to read
        # (waitress reads no further request first) and nothing to send:
        # it waits out of waitress' map, whose every channel the loop asks
        # at every pass (admission.WaitingRoom), until a worker takes it.
        room = getattr(self.server, "waiting_room", None)
        if room is not None:
            with self.requests_lock:
                if (
                    self.requests
                    and self._servicing is None
                    and not HTTPChannel.readable(self)
                    and not self.writable()
                ):
                    room.enter(self)
        return handled

    def service(self):
        room = getattr(self.server, "waiting_room", None)
        with self.requests_lock:
            if room is not None:
                room.leave(self)  # back in the map before the request runs
            self._servicing = threading.get_ident()
        try:
            super().service()
        except LeaveWorker as parked:
            stream = parked.stream
            # server.pull_trigger() takes no thunk; the trigger's does.
            self.server.trigger.pull_trigger(functools.partial(_detach, self, stream))
        finally:
            self._servicing = None

    def cancel(self):
        # waitress' shutdown cancels the requests still queued; a channel
        # that waited out of the map is not closed with the map's.
        super().cancel()
        room = getattr(self.server, "waiting_room", None)
        if room is not None:
            with self.requests_lock:
                waited = room.leave(self, back=False)
            if waited:
                self.handle_close()


_warned = set()


def install(server):
    """Let ``server`` (a waitress server) park streams from now on.

    Runs its change in the server's I/O thread, so that no connection is
    accepted between the class change and the sweep of live channels.
    Safe to call often; a server whose ``channel_class`` someone else
    customised is left alone (logged once).
    """
    if not SUPPORTED or not hubs.SUPPORTED:
        return
    if getattr(server, "channel_class", None) is ParkingChannel:
        return
    server.trigger.pull_trigger(functools.partial(_install, server))


def _install(server):
    try:
        if server.channel_class is ParkingChannel:
            return
        if server.channel_class is not HTTPChannel:
            if id(server) not in _warned:
                _warned.add(id(server))
                logger.info(
                    "streams do not park on this server: its channel class is %r",
                    server.channel_class,
                )
            return
        server.channel_class = ParkingChannel
        if type(server.task_dispatcher) is ThreadedTaskDispatcher:
            admission.install(server.task_dispatcher)
            admission.WaitingRoom.install(server)
            admission.accept_in_batches(server)
        if loop_polls(server):
            raise_open_files_limit()
        for channel in list(server.active_channels.values()):
            if type(channel) is HTTPChannel:
                # Same layout, no new state: allowed.  A channel inside
                # service() now cannot park its current request
                # (_servicing is None for it).
                channel.__class__ = ParkingChannel
    except Exception:
        logger.exception("cannot let streams park on %r", server)


def raise_open_files_limit():
    """Raise RLIMIT_NOFILE's soft limit to the hard one; the new soft limit.

    Each parked stream holds a socket (and a log stream its file); the
    usual soft limit of 1024 would refuse connections far below the cap.
    Only with ``asyncore_use_poll``: under select() fds from 1024 on would
    kill waitress' loop instead.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            logger.info("open-files limit raised from %d to %d for parked streams", soft, hard)
            soft = hard
        except (OSError, ValueError):
            logger.warning("cannot raise the open-files limit from %d", soft, exc_info=True)
    return soft


def installed(environ):
    """True when the request's waitress channel may park a stream."""
    return type(channel_of(environ)) is ParkingChannel


def parkable(stream, task):
    """True when ``stream``, iterated by ``task``, may park now."""
    from collective.streamguard.probes import WaitressConnection

    if not SUPPORTED or not hubs.SUPPORTED or task is None:
        return False
    channel = task.channel
    if (
        type(channel) is not ParkingChannel
        or channel._servicing != threading.get_ident()
        or not channel.connected
        or channel.socket is None
        or channel.task_class is not WSGITask
    ):
        return False
    if not task.complete or not task.has_body or task.content_length is not None:
        return False
    if task.wrote_header and not (task.chunked_response or task.close_on_finish):
        return False
    guard = stream.guard
    connection = guard.connection
    if type(connection) is not WaitressConnection or connection.channel is not channel:
        return False
    if guard.live_streams.shutting_down.is_set():
        return False
    if not loop_polls(channel.server) and channel.socket.fileno() >= SELECT_SAFE_FD:
        _warn_select(channel.server)
        return False
    return True


def loop_polls(server):
    """True when the server's loop uses poll(), not select().

    waitress' own ``run()`` passes ``asyncore_use_poll`` to its loop; a
    subclass that runs the loop itself (webtest's StopableWSGIServer does,
    always with select()) says so with a ``loop_uses_poll`` attribute."""
    if BaseWSGIServer is not None and type(server).run is BaseWSGIServer.run:
        return bool(server.adj.asyncore_use_poll)
    return bool(getattr(server, "loop_uses_poll", False))


def _warn_select(server):
    if ("select", id(server)) not in _warned:
        _warned.add(("select", id(server)))
        logger.warning(
            "streams stop parking: waitress uses select(), which cannot watch fds "
            "from 1024 on; set asyncore_use_poll = true to park many streams"
        )


def park(stream, frame):
    """``GuardedStream``'s park function under waitress: raises ``LeaveWorker``
    when the stream parks, returns when it cannot (it then holds its
    thread)."""
    task = task_of(frame)
    if not parkable(stream, task):
        return
    if not task.wrote_header:
        task.write(b"")  # the headers, as finish() would send them
        if not (task.chunked_response or task.close_on_finish):
            return
    channel = task.channel
    scheduler = _scheduler(channel.server, stream.guard.live_streams)
    parked = ParkedStream(
        hubs.hub(),
        scheduler,
        stream,
        channel.socket,
        chunked=task.chunked_response,
        close_channel=functools.partial(_close_channel, channel),
    )
    # What the direct output holds goes first, while the channel is ours;
    # the thread's locals go back to what the next request on this worker
    # expects (a zodb=True producer's transaction manager, site, user).
    stream.prepare_park(parked)
    raise LeaveWorker(parked)


_schedulers = {}
_schedulers_lock = threading.Lock()


def _scheduler(server, live_streams):
    key = (id(server.task_dispatcher), id(live_streams))
    with _schedulers_lock:
        scheduler = _schedulers.get(key)
        if scheduler is None or scheduler.dispatcher is not server.task_dispatcher:
            threads = int(server.adj.threads)
            scheduler = Scheduler(
                functools.partial(_add_runner, server.task_dispatcher),
                max(1, threads - 1),
                live_streams.shutting_down,
            )
            scheduler.dispatcher = server.task_dispatcher
            _schedulers[key] = scheduler
        return scheduler


class _QuietForRunners(logging.Filter):
    """waitress' ``add_task`` warns "Task queue depth is N" on every call
    while tasks wait for a thread.  Our runners are few (threads - 1) and
    wait by design; their warnings would also land in the event log, and
    every line there wakes every parked follower of the event log, whose
    steps queue more runners: a loop.  Only the runners' warnings go."""

    def filter(self, record):
        return not getattr(_adding, "runner", False)


class QueueWarningsPerSecond(logging.Filter):
    """At most one of waitress' "Task queue depth is N" warnings a second,
    with how many were left out.  waitress writes one for every request
    queued while its workers are busy: when a thousand viewers come back at
    once, a thousand lines in the event log in a few seconds, and every
    line wakes every parked follower of the event log (which are those
    thousand viewers): a million steps for nothing.  The depth still shows,
    once a second."""

    def __init__(self, interval=1.0, clock=time.monotonic):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.lock = threading.Lock()
        self.next_at = None
        self.left_out = 0

    def reset(self):
        """Let the next warning through."""
        with self.lock:
            self.next_at, self.left_out = None, 0

    def filter(self, record):
        now = self.clock()
        with self.lock:
            if self.next_at is not None and now < self.next_at:
                self.left_out += 1
                return False
            self.next_at = now + self.interval
            left_out, self.left_out = self.left_out, 0
        if left_out:
            record.msg = f"{record.getMessage()} ({left_out} more such warnings left out)"
            record.args = ()
        return True


_adding = threading.local()
_queue_logger = logging.getLogger("waitress.queue")
# Runners first: their warnings are not counted as left out.
_queue_logger.addFilter(_QuietForRunners())
#: The filter on waitress' queue logger (``reset()`` lets the next through).
queue_warnings = QueueWarningsPerSecond()
_queue_logger.addFilter(queue_warnings)


def _add_runner(dispatcher, runner):
    _adding.runner = True
    try:
        dispatcher.add_task(runner)
    finally:
        _adding.runner = False


def _detach(channel, stream):
    # The I/O thread, inside the trigger's handle_read with its lock held:
    # no pull_trigger(thunk) from here.
    try:
        with stream.lock:
            abandoned = not stream.adopting()
        if abandoned:
            # Shutdown ended the stream before this thunk ran: the channel
            # goes as waitress' end of request would close it.
            _close_channel(channel)
            return
        sock = channel.socket
        if (
            not channel.connected
            or sock is None
            or channel._map.get(channel._fileno) is not channel
        ):
            # waitress closed it meanwhile (lookahead >= 1 read the FIN, or
            # a send failed): the stream ends on a worker.
            stream.orphan()
            return
        with channel.outbuf_lock:
            # Nothing sends on this channel now: only this thread does.
            leftovers = channel.outbufs
            channel.outbufs = []
            pending, channel.total_outbufs_len = channel.total_outbufs_len, 0
            channel.current_outbuf_count = 0
        if not pending:
            for buffer in leftovers:
                buffer.close()
            leftovers = ()
        channel.del_channel()  # out of waitress' map and active_channels
        _let_go(channel, stream)
        stream.adopt(leftovers)
    except Exception:
        logger.exception("cannot park %r", stream)
        stream.orphan()


def _let_go(channel, stream):
    # Out of waitress' map, the channel is never served again: its request
    # parsers (the stream's request, and any pipelined one, never served
    # now) are closed at once, and the stream keeps only the socket.  The
    # channel, its locks and Condition, its parsers' headers and buffers
    # then go (about 3 KB per parked stream).
    with channel.requests_lock:
        parsers = [*channel.requests, channel.request]
        channel.requests = []
        channel.request = None
    for parser in parsers:
        if parser is not None:
            parser.close()
    stream.close_channel = functools.partial(_close_socket, channel.socket)
    stream.guard.connection.release_channel()


def _close_socket(sock):
    # The hub thread, after the socket left its epoll set: what is left of
    # waitress' handle_close() for a channel already out of its map (its
    # output buffers are the stream's now, its parsers closed): the close,
    # ignoring the errors wasyncore's dispatcher.close() ignores.
    try:
        sock.close()
    except OSError as error:
        if error.errno not in (errno.ENOTCONN, errno.EBADF):
            raise


def _close_channel(channel):
    # The hub thread, after the socket left its epoll set: what waitress'
    # end of request and handle_close() would have done.
    with channel.requests_lock:
        for request in channel.requests:
            request.close()
        channel.requests = []
        if channel.request is not None:
            channel.request.close()
            channel.request = None
    channel.handle_close()
