"""A WSGI app whose streams park, for tests on a real waitress (no Zope).

``/idle?tag=T`` sends ``start T\\n``, then waits in ``guard.idle()``; each
``App.send(tag, data)`` (from any thread) queues ``data`` and wakes the
stream, which sends it and parks again.  ``&end=1`` after the data: the
producer returns (FINISHED); ``&raise=1``: it raises after being resumed;
``&timeout=S``: idle timeout (the producer then sends ``timeout\\n``);
``&max=S``: max_duration; ``&heartbeat=S``: SSE heartbeats; ``&fd=1``: it
waits on a pipe of its own as well (``App.pipe_write``); ``&blocking=1``:
it waits in ``guard.wait()`` (holds its thread); ``&wakestep=1``: its idle()
has a ``wake_step`` that sends what is queued from the hub (a parked group
may hold it: ``parking.group``); ``/wrapped?...``: behind a middleware that
iterates the body (holds its thread).
"""

import collections
import os
import threading
from urllib.parse import parse_qs

from webtest.http import StopableWSGIServer

from collective.streamguard.connection import client_connection
from collective.streamguard.guard import GuardedStream
from collective.streamguard.guard import StreamGuard
from collective.streamguard.streams import LiveStreams
from collective.streamguard.waitress import park as waitress_park
from collective.streamguard.waitress.output import DirectOutput

HEARTBEAT = b": hb\n\n"


class PollingServer(StopableWSGIServer):
    """webtest's server, its loop on poll() as waitress' own ``run()`` does
    with ``asyncore_use_poll`` (webtest's always uses select(), which dies
    on the first fd above 1023)."""

    loop_uses_poll = True

    def run(self):
        try:
            self.asyncore.loop(0.5, map=self._map, use_poll=True)
        except OSError:  # pragma: no cover
            if not self.was_shutdown:
                raise


class Stream:
    def __init__(self, tag):
        self.tag = tag
        self.queue = collections.deque()
        self.guard = None
        self.finally_ran = 0
        self.cleanups = []
        self.threads = set()
        self.pipe = None
        #: ``&gate=1``: the producer waits for it after its first line.
        self.gate = threading.Event()


class App:
    def __init__(self, live_streams=None):
        self.live_streams = live_streams or LiveStreams()
        self.streams = {}
        self.lock = threading.Lock()

    def stream(self, tag):
        with self.lock:
            return self.streams.get(tag)

    def send(self, tag, data):
        stream = self.stream(tag)
        stream.queue.append(data)
        stream.guard.wake()

    def pipe_write(self, tag, data):
        stream = self.stream(tag)
        stream.queue.append(data)
        os.write(stream.pipe[1], b"x")

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/page":
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
            return [b"ok"]
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        tag = query.get("tag", "")
        stream = Stream(tag)
        with self.lock:
            self.streams[tag] = stream
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        heartbeat = float(query.get("heartbeat", 0)) or None
        guard = StreamGuard(
            client_connection(environ),
            max_duration=float(query.get("max", 0)) or None,
            heartbeat=HEARTBEAT if heartbeat else None,
            heartbeat_interval=heartbeat,
            live_streams=self.live_streams,
        )
        stream.guard = guard
        guard.add_cleanup(lambda: stream.cleanups.append(guard.reason))
        if "fd" in query:
            stream.pipe = os.pipe()
            os.set_blocking(stream.pipe[0], False)
        body = GuardedStream(
            lambda guard: self.producer(guard, stream, query),
            guard,
            label=tag,
            park=waitress_park.park,
            direct_output=DirectOutput.for_caller,
        )
        if path == "/wrapped":
            return self.middleware(body)
        return body

    def producer(self, guard, stream, query):
        try:
            yield b"start %s\n" % stream.tag.encode()
            if "gate" in query:
                stream.gate.wait(10)
            timeout = float(query["timeout"]) if "timeout" in query else None
            readable = [stream.pipe[0]] if stream.pipe else []
            while True:
                stream.threads.add(threading.get_ident())
                while stream.queue:
                    data = stream.queue.popleft()
                    if data == b"END":
                        return
                    if data == b"RAISE":
                        raise RuntimeError("producer failed on purpose")
                    yield data
                if stream.pipe:
                    try:
                        os.read(stream.pipe[0], 4096)
                    except BlockingIOError:
                        pass
                if "blocking" in query:
                    if guard.wait(timeout):
                        return
                    continue
                before = len(stream.queue)
                wake_step = (lambda: self.wake_step(stream)) if "wakestep" in query else None
                if (yield from guard.idle(timeout, readable, wake_step=wake_step)):
                    return
                if timeout is not None and not stream.queue and before == 0:
                    yield b"timeout\n"
        finally:
            stream.finally_ran += 1
            if stream.pipe:
                for fd in stream.pipe:
                    os.close(fd)

    @staticmethod
    def wake_step(stream):
        """The queued data, sent from the hub; None (a step then runs) when
        the producer must see it: the end, a failure."""
        chunks = []
        while stream.queue:  # App.send appends meanwhile: one at a time
            data = stream.queue.popleft()
            if data in (b"END", b"RAISE"):
                stream.queue.appendleft(data)
                stream.queue.extendleft(reversed(chunks))
                return None
            chunks.append(data)
        return chunks

    @staticmethod
    def middleware(body):
        try:
            for data in body:  # noqa: UP028 (sees every chunk, as middleware do)
                yield data
        finally:
            body.close()
