"""Large chunks go straight onto waitress' channel (``waitress_output``).

A real waitress (webtest's StopableWSGIServer, as plone.testing uses) runs
in this process and is read over real sockets, so the test can read the
stream's end line from the log: how many bytes took the direct way.
"""

import socket
import threading
import time
import unittest
from urllib.parse import parse_qs

from waitress.channel import HTTPChannel
from webtest.http import StopableWSGIServer

from collective.streamguard.connection import client_connection
from collective.streamguard.guard import GuardedStream
from collective.streamguard.guard import StreamGuard
from collective.streamguard.streams import EndReason
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import Recorder
from collective.streamguard.tests.helpers import dechunk
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.waitress.output import HELD_LIMIT
from collective.streamguard.waitress.output import QUEUE_LIMIT
from collective.streamguard.waitress.output import RECHECK
from collective.streamguard.waitress.output import DirectOutput

MiB = 1 << 20


def chunk(index, size):
    """Chunk ``index`` of ``size`` bytes: different bytes for every chunk."""
    line = f"chunk {index:06d} ".encode()
    return (line * (size // len(line) + 1))[:size]


def expected_body(sizes):
    return b"".join(chunk(i, size) for i, size in enumerate(sizes))


class CountingGuard(StreamGuard):
    """Counts ``check()``: a producer held back on a full queue asks it
    every ``RECHECK`` seconds whether to stop, and at nothing else."""

    checks = 0

    def check(self):
        self.checks += 1
        return super().check()


class RecordingChannel(HTTPChannel):
    """waitress' own channel, keeping what each ``write_soon()`` queued (bytes,
    or the buffer's type name) in its server's ``queued``: each queueing
    sends (waitress' ``send_bytes`` is 1)."""

    def write_soon(self, data):
        self.server.queued.append(data if isinstance(data, bytes) else type(data).__name__)
        return super().write_soon(data)


class App:
    """``/chunks?sizes=70000,10,1048576`` yields those chunks under a guard
    (``&batch=1``: with ``guard.batch_output``, ``&pause=S``: then waits S
    seconds in the guard and yields "end", ``&first_wait=S``: waits S
    seconds in the guard before the first, ``&fail_first=1``: raises before
    the first, ``&repeat=N``: the sizes N times);
    ``/wrapped?...`` the same behind a middleware that iterates the body."""

    def __init__(self):
        self.produced = 0
        self.cleanups = 0
        self.guard = None  # the last stream's

    def __call__(self, environ, start_response):
        query = parse_qs(environ.get("QUERY_STRING", ""))
        sizes = [int(s) for s in query["sizes"][0].split(",")] * int(query.get("repeat", ["1"])[0])
        pause = float(query.get("pause", ["0"])[0])
        first_wait = float(query.get("first_wait", ["0"])[0])
        fail_first = "fail_first" in query
        batch = "batch" in query
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        guard = self.guard = CountingGuard(client_connection(environ))
        guard.add_cleanup(self.cleaned)
        body = GuardedStream(
            lambda guard: self.producer(guard, sizes, pause, batch, first_wait, fail_first),
            guard,
            label=environ["PATH_INFO"],
            direct_output=DirectOutput.for_caller,
        )
        if environ["PATH_INFO"] == "/wrapped":
            return self.middleware(body)
        return body

    def producer(self, guard, sizes, pause, batch, first_wait=0, fail_first=False):
        guard.batch_output = batch
        if first_wait and guard.wait(first_wait):
            return
        if fail_first:
            raise RuntimeError("the producer failed before its first chunk")
        for index, size in enumerate(sizes):
            data = chunk(index, size)
            self.produced += size
            yield data
        if pause:
            guard.wait(pause)
            yield b"end"

    @staticmethod
    def middleware(body):
        try:
            for data in body:  # noqa: UP028 (sees every chunk, as middleware do)
                yield data
        finally:
            body.close()

    def cleaned(self):
        self.cleanups += 1


class DirectOutputTests(unittest.TestCase):
    def setUp(self):
        self.recorder = Recorder.attach(self)
        self.app = App()
        server = self.server = StopableWSGIServer.create(
            self.app, threads=4, expose_tracebacks=False
        )
        self.addCleanup(server.runner.join, 10)
        self.addCleanup(server.shutdown)
        self.address = (server.adj.host, server.adj.port)
        self.assertTrue(server.wait())
        # The test's connections, not wait()'s own.
        server.queued = []
        server.channel_class = RecordingChannel

    def connect(self, path, version="1.1", method="GET"):
        sock = HTTPClient(self.address)
        self.addCleanup(sock.close)
        close = {"Connection": "close"} if version == "1.1" else {}
        return sock.request(path, method=method, version=version, headers=close)

    def fetch(self, path, version="1.1", method="GET"):
        return self.connect(path, version, method).read_all(timeout=60)

    def ended(self):
        self.assertTrue(wait_for(lambda: self.recorder.ended), "the stream did not end")
        [ended] = self.recorder.ended
        return ended

    def test_large_chunks_arrive_exactly_and_in_order_with_small_ones(self):
        sizes = [70_000, 10, MiB, 5, 3 * MiB + 7, 65_536, 65_535, 200_000, MiB, MiB, 1]
        for batch in ("", "&batch=1"):
            with self.subTest(batch=batch):
                del self.recorder.ended[:]
                path = f"/chunks?sizes={','.join(map(str, sizes))}{batch}"
                head, body = dechunk(self.fetch(path))
                self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
                self.assertEqual(body, expected_body(sizes))
                ended = self.ended()
                self.assertEqual((ended["reason"], ended["sent"]), ("finished", sum(sizes)))
                # The headers go out before a large first chunk (a small one
                # goes with them), so every chunk of 64 KiB or more takes the
                # direct way; smaller ones do not.
                self.assertEqual(ended["direct"], 70_000 + 6 * MiB + 7 + 65_536 + 200_000)

    def test_a_small_first_chunk_is_queued_with_the_headers(self):
        # One queueing, so one send: waitress' Task.write queues the headers
        # and the chunk apart, and each queueing sent (two sends per stream
        # opened, a thousand times when a thousand viewers come back).
        head, body = dechunk(self.fetch("/chunks?sizes=100,70000"))
        self.assertEqual(body, expected_body([100, 70_000]))
        first = self.server.queued[0]
        self.assertTrue(first.startswith(b"HTTP/1.1 200 OK\r\n"), first)
        self.assertTrue(first.endswith(b"\r\n\r\n64\r\n" + chunk(0, 100) + b"\r\n"), first)
        # The large second chunk took the direct way, after it.
        self.assertEqual(self.server.queued[1], "ChunkBuffer")
        self.assertEqual(self.ended()["direct"], 70_000)

    def test_the_headers_come_before_the_producer_first_waits(self):
        # Nothing to send yet: the headers go before the wait, not with the
        # first chunk, or a proxy in front would give up (nginx: 504).
        sock = self.connect("/chunks?sizes=10&first_wait=120")
        head = read_until(sock, b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertEqual(self.server.queued, [head])
        self.assertFalse(self.recorder.ended)  # still waiting
        sock.close()
        self.assertEqual(self.ended()["reason"], "client gone")

    def test_a_producer_that_fails_before_its_first_chunk_leaves_the_body_unfinished(self):
        # The headers were not out yet: they go first, then the connection
        # closes without the chunked body's last chunk (the client can tell).
        with self.assertLogs("collective.streamguard", "INFO") as logs:
            sock = self.connect("/chunks?sizes=10&fail_first=1")
            head = read_until(sock, b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
            self.assertIn(b"Transfer-Encoding: chunked", head)
            with self.assertRaisesRegex(AssertionError, "server closed before the body ended"):
                sock.body()
        # Logged before the connection closed: the failure, then the end.
        self.assertIn("failed before its first chunk", "\n".join(logs.output))
        self.assertRegex("\n".join(logs.output), r"stream \d+ ended \(error\)")

    def test_http_1_0_body_runs_to_the_close(self):
        sizes = [100, 2 * MiB, 80_000, 3]
        raw = self.fetch(f"/chunks?sizes={','.join(map(str, sizes))}&batch=1", version="1.0")
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head)
        self.assertEqual(body, expected_body(sizes))
        self.assertEqual(self.ended()["direct"], 2 * MiB + 80_000)

    def test_a_middleware_in_between_gets_ordinary_chunks(self):
        sizes = [10, 2 * MiB, 70_000]
        _, body = dechunk(self.fetch(f"/wrapped?sizes={','.join(map(str, sizes))}"))
        self.assertEqual(body, expected_body(sizes))
        self.assertEqual(self.ended()["direct"], 0)

    def test_nothing_is_held_back_while_the_producer_waits(self):
        sizes = [10] + [MiB] * 6
        sock = self.connect(f"/chunks?sizes={','.join(map(str, sizes))}&pause=5&batch=1")
        start = time.monotonic()
        raw = read_until(sock, chunk(6, MiB)[-100:] + b"\r\n", timeout=10)
        # All six chunks arrived while the producer still waits.
        self.assertLess(time.monotonic() - start, 4)
        self.assertFalse(self.recorder.ended)
        self.assertIn(chunk(1, MiB)[:100], raw)
        self.assertTrue(sock.body(timeout=10).endswith(b"end"))
        self.assertEqual(self.ended()["reason"], "finished")

    def test_a_client_that_stops_reading_holds_the_producer_back(self):
        before_produced, before_cleanups = self.app.produced, self.app.cleanups
        sock = self.connect("/chunks?sizes=1048576&repeat=2000&batch=1")  # 2 GiB
        read_until(sock, b"\r\n\r\n")

        # Not reading: the kernel's socket buffers fill, then waitress'
        # queue up to QUEUE_LIMIT, then the producer waits, asking its guard
        # every RECHECK seconds.  Held back: nothing produced between two
        # of those questions (the second one a whole RECHECK after the first).
        def produces_nothing_for_two_checks():
            produced, checks = self.app.produced, self.app.guard.checks
            wait_for(lambda: self.app.guard.checks >= checks + 2, 3 * RECHECK)
            return self.app.produced == produced

        self.assertTrue(wait_for(lambda: self.app.guard is not None))
        self.assertTrue(wait_for(produces_nothing_for_two_checks, 30), "never held back")
        produced = self.app.produced - before_produced
        self.assertTrue(produces_nothing_for_two_checks(), "the producer went on")
        # Queued, held, and what the loopback socket buffers hold: 14 MiB
        # were produced in all when this was written.
        self.assertLess(produced, QUEUE_LIMIT + HELD_LIMIT + 12 * MiB)
        self.assertFalse(self.recorder.ended)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()  # reset: the client is gone
        ended = self.ended()
        self.assertEqual(ended["reason"], EndReason.CLIENT_GONE.value)
        self.assertEqual(self.app.cleanups, before_cleanups + 1)

    def test_a_client_leaving_mid_transfer_ends_the_stream_once(self):
        before = self.app.cleanups
        sock = self.connect("/chunks?sizes=1048576&repeat=500&batch=1")
        received = 0
        while received < 5 * MiB:
            received += len(sock.read_exactly(MiB))
        sock.close()
        ended = self.ended()
        self.assertEqual(ended["reason"], EndReason.CLIENT_GONE.value)
        self.assertLess(ended["sent"], 500 * MiB)
        self.assertGreater(ended["direct"], 0)
        self.assertEqual(self.app.cleanups, before + 1)
        # Every worker thread is free again: four streams at once finish.
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(self.fetch("/chunks?sizes=10,100000")))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(len(results), 4)
