"""Busy producers off the server's threads: a job pool and its relay.

A producer that works (an export, a batch job: minutes of catalog and ZODB
work) holds whatever thread steps it for its whole life.  Run on the pool
(``stream_response(..., run_on="pool")``), a stream is two halves:

- the *job*: the producer, driven by a ``GuardedStream`` of its own
  (``job_streams``: its own records and end counters) on one of the pool's
  threads (``JobPool``), never on the server's workers.  Its guard's
  "client" is the relay (``RelayConnection``): the producer sees the web
  side's end (the client left, ``max_duration``, shutdown) as the client
  leaving, at its next chunk or in its next ``guard.wait()``/``idle()``;
- the *web side*: the ordinary guarded stream of the request, whose
  producer (``relay_producer``) hands on what the job made and otherwise
  waits in ``guard.idle()``, so that under waitress it parks and holds no
  worker.  When it ends, for whatever reason, its cleanup cancels the job.

``Relay`` carries the chunks between the two, bounded: the job blocks in
``put()`` while more than ``high`` bytes wait for the web side, and the web
side takes them only while the client's own queue is below its high-water
mark (a parked stream's ``OutQueue``).  So a client that does not read holds
the job back; nothing piles up in memory.  The relay knows nothing of
threads or pools: a producer that runs elsewhere (a worker process) can
feed one from a thread that reads the worker's chunks, and hear its cancel
(``on_cancel``).

Beyond the pool's ``size``, admitted jobs wait in a bounded queue
(``queue_size``) and are told their place as it changes (``Job.moved``);
past it ``admit`` refuses (the view answers 503).  A job whose web side
ends while it waits never starts.

Plain Python: imports nothing from Zope or waitress.
"""

import atexit
import collections
import logging
import random
import sys
import threading

from collective.streamguard.connection import RECHECK_INTERVAL
from collective.streamguard.connection import ClientConnection
from collective.streamguard.connection import ConnectionState
from collective.streamguard.connection import Verdict
from collective.streamguard.streams import EndReason
from collective.streamguard.streams import LiveStreams

logger = logging.getLogger("collective.streamguard")

#: The defaults of zope.conf's ``job-pool-size`` and ``job-queue-size``.
DEFAULT_POOL_SIZE = 2
DEFAULT_QUEUE_SIZE = 16
#: A job blocks once this much output waits for its web side (as a parked
#: stream's ``parking.stream.OUT_HIGH``); the web side takes it all at once.
RELAY_HIGH = 256 << 10
#: Retry-After of a stream refused because the queue is full: this many
#: seconds, plus up to as many again at random, so that refused clients do
#: not all come back at the same second.
RETRY_AFTER = 10

#: The interpreter's switch interval while jobs run on the pool (seconds;
#: zope.conf's ``job-switch-interval``, in milliseconds).  Why: the pool's
#: threads share the GIL with the server's.  A job whose step is Python
#: work keeps the GIL for the whole switch interval (CPython's default,
#: 5 ms) each time a page's thread asks for it, and a page asks again
#: after every system call it makes: with two such jobs, Zope's root page
#: took 30-42 times as long as alone; 6-8 times at 0.5 ms, for 13-31 %
#: fewer jobs done (``benchmarks/README.rst``, the job switch interval).
DEFAULT_SWITCH_INTERVAL = 0.0005

#: Where a job is (``Job.state``).
ADMITTED = "admitted"  # waits for its web side's first step, or a thread
RUNNING = "running"
DONE = "done"
WITHDRAWN = "withdrawn"  # its web side ended before it started: it never runs

#: The jobs' own streams: records, end counters (shown by status views).
job_streams = LiveStreams()


def retry_after():
    """Seconds for Retry-After when the queue is full, jittered."""
    return RETRY_AFTER + random.randint(0, RETRY_AFTER)  # noqa: S311 (not a secret)


class Relay:
    """Chunks from a producer that runs elsewhere to its stream's web side.

    Job side: ``put(chunk)`` (blocks above ``high``; False once cancelled),
    then ``finish(reason)``.  Web side: ``take()`` all that waits, and
    ``cancel(reason)`` when the stream ends; ``wake()`` (the web guard's) is
    called when there is something to take.  ``notice(chunk)`` queues a
    chunk that never blocks (a queued job's place).
    """

    def __init__(self, wake, high=RELAY_HIGH):
        self._wake = wake
        self.high = high
        self._cond = threading.Condition()
        self._chunks = collections.deque()
        self.size = 0
        #: The job's end reason once it has ended (its cleanups ran).
        self.end = None
        #: The web side's end reason once it has ended: produce no more.
        self.cancelled = None
        self._signalled = False
        self._on_cancel = []

    def _signal(self):
        # Our lock held: whether the web side must be woken (once per take).
        if self._signalled:
            return False
        self._signalled = True
        return True

    def put(self, chunk, stopping=None):
        """Hand ``chunk`` to the web side; wait while more than ``high``
        bytes wait for it.  False when the web side has gone (the chunk is
        dropped).  ``stopping()``, asked every RECHECK_INTERVAL while it
        waits, ends the wait too (shutdown)."""
        with self._cond:
            if self.cancelled is not None:
                return False
            self._chunks.append(chunk)
            self.size += len(chunk)
            wake = self._signal()
        if wake:
            self._wake()
        with self._cond:
            while self.size > self.high and self.cancelled is None:
                if stopping is not None and stopping():
                    break
                self._cond.wait(RECHECK_INTERVAL)
            return self.cancelled is None

    def notice(self, chunk):
        """Queue ``chunk`` for the web side without waiting."""
        with self._cond:
            if self.cancelled is not None or self.end is not None:
                return
            self._chunks.append(chunk)
            self.size += len(chunk)
            wake = self._signal()
        if wake:
            self._wake()

    def finish(self, reason):
        """The job has ended with ``reason`` (an ``EndReason``)."""
        with self._cond:
            if self.end is not None:
                return
            self.end = reason
            self._signalled = True
        self._wake()

    def take(self):
        """``(chunks, end)``: every chunk waiting now, and the job's end
        reason once it has ended and those are its last."""
        with self._cond:
            chunks = list(self._chunks)
            self._chunks.clear()
            self.size = 0
            self._signalled = False
            self._cond.notify_all()
            return chunks, self.end

    def on_cancel(self, callback):
        """Call ``callback(reason)`` once, when the web side cancels."""
        self._on_cancel.append(callback)

    def cancel(self, reason):
        """The web side has ended (``reason``): the job stops at its next
        chunk or wait.  Once only; nothing after the job's own end."""
        with self._cond:
            if self.cancelled is not None:
                return
            self.cancelled = reason or EndReason.CLIENT_GONE
            self._chunks.clear()
            self.size = 0
            self._cond.notify_all()
            callbacks, self._on_cancel = self._on_cancel, []
        for callback in callbacks:
            try:
                callback(self.cancelled)
            except Exception:
                logger.exception("cancelling a job failed: %r", callback)


class RelayConnection(ClientConnection):
    """A job's "client connection": closed once its web side has ended."""

    probe = "relay"

    def __init__(self, relay):
        super().__init__()
        self.relay = relay

    def _probe(self):
        if self.relay.cancelled is not None:
            return Verdict(ConnectionState.CLOSED, self.probe)
        return Verdict(ConnectionState.OPEN, self.probe)


class Job:
    """One producer run by the pool for one stream.

    ``stream``: the job's ``GuardedStream`` (its guard's connection a
    ``RelayConnection`` on ``relay``), built where the request is, stepped
    on a pool thread.  ``notice(position, first)``: the chunk that tells
    the client its place in the queue (0: it starts now), or None.
    """

    def __init__(self, stream, relay, notice=None, label=""):
        self.stream = stream
        self.relay = relay
        self.label = label
        self._notice = notice
        self.state = ADMITTED
        #: Its place in the queue: 0 while it runs or is about to.
        self.position = 0
        #: The request's transaction is over: it may start (``activate``).
        self.ready = False
        self.was_queued = False
        self._told = 0  # the last place the client was told
        #: The id of the web side's stream record (status views).
        self.stream_id = None
        self.pool = None
        relay.on_cancel(self._cancelled)

    def __repr__(self):
        return f"<Job {self.label!r} {self.state} position={self.position}>"

    def moved(self, position):
        """The pool moved the job to ``position`` (0: it starts)."""
        if position == self._told:
            return
        self._told = position
        first = not self.was_queued
        if position:
            self.was_queued = True
        elif first:
            return  # it never waited: nothing to tell
        if self._notice is not None:
            chunk = self._notice(position, first)
            if chunk:
                self.relay.notice(chunk)

    def run(self):
        """Step the producer until it ends, handing its chunks on (a pool
        thread).  Never raises: the stream logs and ends a failure."""
        body, relay = self.stream, self.relay
        stopping = body.guard.check
        try:
            while True:
                try:
                    chunk = body.step()
                except StopIteration:
                    break
                except Exception:
                    break  # logged and ended (ERROR) by the stream
                if chunk:
                    relay.put(chunk, stopping)
        finally:
            # Ended already, but for a stop between two steps.
            body.close()
            relay.finish(body.guard.reason or EndReason.FINISHED)

    def _cancelled(self, reason):
        # The web side ended: stop the job at its next chunk or wait, or
        # withdraw it from the queue.  Any thread.
        if self.stream is None:
            # Never made (the view failed): it only leaves the queue.
            if self.pool is not None:
                self.pool.withdraw(self)
            return
        guard = self.stream.guard
        guard.stop(reason)
        guard.wake()
        if self.pool is not None and self.pool.withdraw(self):
            # It never started: its stream ends without running a step.
            self.stream.close()


class QueueFull(Exception):
    """``JobPool.admit``: the pool's queue is full."""


class JobPool:
    """A bounded pool of job threads with a bounded queue in front of it.

    ``size`` threads run jobs; up to ``queue_size`` more wait their turn, in
    the order they came.  Threads are started when first needed and are
    daemons: at exit the jobs' streams are stopped (``job_streams``) so that
    their cleanups run.
    """

    def __init__(self, size=DEFAULT_POOL_SIZE, queue_size=DEFAULT_QUEUE_SIZE, name="jobs"):
        self.name = name
        self._cond = threading.Condition()
        self.size = max(1, size)
        self.queue_size = max(0, queue_size)
        self._pending = []  # admitted, not started, in order
        self._running = []
        self._threads = 0
        self._stopping = False
        self.refused = 0
        self.started = 0
        self.withdrawn = 0
        #: ``sys.setswitchinterval`` while a job runs (None: left alone).
        self.switch_interval = DEFAULT_SWITCH_INTERVAL
        self._saved_switch_interval = None

    def configure(self, size, queue_size, switch_interval=DEFAULT_SWITCH_INTERVAL):
        """Change the bounds (from the deployment's settings)."""
        with self._cond:
            self.size = max(1, int(size))
            self.queue_size = max(0, int(queue_size))
            self.switch_interval = switch_interval
            self._tell(self._positions())
            self._cond.notify_all()
        self._start_threads()

    def admit(self, job):
        """Take ``job`` in (it starts once ``activate``d and a thread is
        free); raises ``QueueFull`` past the queue's bound.  Returns its
        place: 0 when it starts at once, else its position in the queue."""
        with self._cond:
            if self._stopping or len(self._pending) + len(self._running) >= (
                self.size + self.queue_size
            ):
                self.refused += 1
                raise QueueFull(f"{len(self._pending)} jobs wait for {self.size} threads")
            job.pool = self
            self._pending.append(job)
            self._tell(self._positions())
            return job.position

    def activate(self, job):
        """``job`` may start: its request's transaction is over."""
        with self._cond:
            job.ready = True
            self._cond.notify_all()
        self._start_threads()

    def withdraw(self, job):
        """Take a job that has not started out of the queue; True if it was
        there (it will never run)."""
        with self._cond:
            if job.state is not ADMITTED or job not in self._pending:
                return False
            self._pending.remove(job)
            job.state = WITHDRAWN
            self.withdrawn += 1
            self._tell(self._positions())
        return True

    def _positions(self):
        # Our lock held: every waiting job's place, and those that changed.
        free = max(0, self.size - len(self._running))
        moves = []
        for index, job in enumerate(self._pending):
            position = max(0, index - free + 1)
            if position != job.position:
                job.position = position
                moves.append((job, position))
        return moves

    def _tell(self, moves):
        # Our lock held, so that the notices of one job go out in order
        # (a notice only queues a chunk and wakes the web side).
        for job, position in moves:
            try:
                job.moved(position)
            except Exception:
                logger.exception("telling %r its place failed", job)

    def _start_threads(self):
        with self._cond:
            wanted = min(self.size, len(self._pending) + len(self._running))
            start = max(0, wanted - self._threads)
            self._threads += start
        for _ in range(start):
            threading.Thread(
                target=self._serve, name=f"streamguard-{self.name}", daemon=True
            ).start()

    def _next(self):
        # Our lock held: the first ready job, if a thread may run it.
        if len(self._running) >= self.size:
            return None
        for job in self._pending:
            if job.ready:
                return job
        return None

    def _serve(self):
        while True:
            with self._cond:
                while True:
                    if self._stopping or self._threads > self.size:
                        self._threads -= 1
                        return
                    job = self._next()
                    if job is not None:
                        break
                    if not self._pending:
                        # Nothing to do: this thread goes (started again
                        # when a job comes).
                        self._threads -= 1
                        return
                    self._cond.wait(RECHECK_INTERVAL)
                self._pending.remove(job)
                self._running.append(job)
                if len(self._running) == 1:
                    self._shorten_switch_interval()
                job.state = RUNNING
                job.position = 0
                self.started += 1
                moves = self._positions()
                if job.was_queued:
                    moves.append((job, 0))
                self._tell(moves)
            try:
                job.run()
            except Exception:  # pragma: no cover (run() catches all)
                logger.exception("%r failed", job)
            with self._cond:
                self._running.remove(job)
                if not self._running:
                    self._restore_switch_interval()
                job.state = DONE
                self._tell(self._positions())
                self._cond.notify_all()

    def _shorten_switch_interval(self):
        # Our lock held; the first job starts.  Process-wide, so only while
        # jobs run: a shorter interval costs every thread more GIL switches.
        wanted = self.switch_interval
        if wanted is None or self._saved_switch_interval is not None:
            return
        current = sys.getswitchinterval()
        if wanted < current:
            sys.setswitchinterval(wanted)
            # What we set, read back (the interpreter keeps microseconds).
            self._saved_switch_interval = (current, sys.getswitchinterval())

    def _restore_switch_interval(self):
        # Our lock held; the last job ended.  Unless somebody else has
        # changed the interval since (then theirs stays).
        saved, self._saved_switch_interval = self._saved_switch_interval, None
        if saved is not None and sys.getswitchinterval() == saved[1]:
            sys.setswitchinterval(saved[0])

    @property
    def threads(self):
        """How many job threads live now (they go when nothing waits)."""
        with self._cond:
            return self._threads

    def place_of(self, stream_id):
        """``("pool", 0)`` or ``("queued", position)`` for the web stream
        ``stream_id`` whose job is here, else None."""
        with self._cond:
            for job in self._running:
                if job.stream_id == stream_id:
                    return ("pool", 0)
            for job in self._pending:
                if job.stream_id == stream_id:
                    return ("queued", job.position) if job.position else ("pool", 0)
        return None

    def snapshot(self):
        """The pool's bounds and counts as plain data."""
        with self._cond:
            return {
                "size": self.size,
                "queue_size": self.queue_size,
                "switch_interval": self.switch_interval,
                "running": len(self._running),
                "queued": sum(1 for job in self._pending if job.position),
                "starting": sum(1 for job in self._pending if not job.position),
                "started": self.started,
                "refused": self.refused,
                "withdrawn": self.withdrawn,
                "ended": job_streams.snapshot()["ended"],
            }

    def stop(self):
        """Let the threads go once their jobs have ended (exit)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()


def relay_producer(job):
    """The web side's producer of ``job``: what the job made, as it comes;
    it waits in ``guard.idle()`` (and parks) in between."""

    def relay(guard):
        # The first step runs after the request's transaction: the job may
        # start now, and sees what the request committed.
        job.pool.activate(job)
        while True:
            chunks, end = job.relay.take()
            yield from chunks
            if end is not None:
                if end is not EndReason.FINISHED:
                    # The stream ends as the job did: failed (the client
                    # is told in the stream's format), timeout, shutdown.
                    guard.stop(end)
                return
            if (yield from guard.idle()):
                return

    return relay


def cancel_with(guard, relay):
    """A web guard's cleanup: its job stops with the web side's reason."""
    guard.add_cleanup(lambda: relay.cancel(guard.reason))


#: The process's pool (``stream_response(run_on="pool")``).
pool = JobPool()


@atexit.register
def _stop_jobs_at_exit():
    pool.stop()
    if job_streams.live():
        job_streams.shutdown()
