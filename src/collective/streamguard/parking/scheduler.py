"""The steps of resumed parked streams, on the server's own workers.

``Scheduler`` keeps the ready streams of one server and at most
``max_runners`` ``Runner`` tasks in the server's task queue (one thread
always stays for normal pages); each runner runs ready streams' steps for
one ``SLICE``, then gives the worker back.

Plain Python: imports nothing from Zope or waitress (``add_task`` is the
server's, handed in).
"""

import collections
import logging
import threading
import time

logger = logging.getLogger("collective.streamguard")

#: A runner gives the worker back after this long, so that streams catching
#: up cannot keep a thread from normal pages.
SLICE = 0.02


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
