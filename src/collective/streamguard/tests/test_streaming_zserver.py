"""Guarded streaming on classic ZServer: ``response.write()`` in the worker.

ZServer itself only runs on Python 2.7, which cannot be had here.  These
tests reproduce its contract with real asyncore sockets (the fixture of
``zserver_standin``) plus a response whose ``write()`` pushes to the
channel from the worker thread and silently drops data once the channel is
closed, as ``ZServer.HTTPResponse`` does; its ``stdout`` is the
``ChannelPipe`` that lets the probe find the request's channel.
"""

import threading

from collective.streamguard.streaming import stream_response
from collective.streamguard.streams import live_streams
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.zserver_standin import ZServerContractTestCase


class ZServerResponse:
    """What ``stream_response`` uses of ZServer's HTTPResponse."""

    def __init__(self, pipe, server):
        self.stdout = pipe
        self.server = server
        self.headers = {}
        self.status = 200
        self.written = []

    def setStatus(self, status):
        self.status = status

    def setHeader(self, name, value):
        self.headers[name.lower()] = value

    def write(self, data):
        channel = self.stdout._channel
        if channel is None or channel.closed:
            return  # ZServer drops data for a closed channel, never raises
        if not self.written:
            head = "HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
            self.server.calls.put(lambda: channel.push(head.encode() + b"\r\n"))
        self.written.append(data)
        self.server.calls.put(lambda: channel.push(data))


class ZServerRequest:
    def __init__(self, fake, server):
        self.environ = dict(fake.environ, REQUEST_METHOD="GET", PATH_INFO="/stream")
        self.response = ZServerResponse(fake.response.stdout, server)
        self.other = {}

    def get(self, key, default=None):
        return self.other.get(key, self.environ.get(key, default))


class WriteModeTests(ZServerContractTestCase):
    def serve(self, request, producer):
        """Call the view in a worker thread, as ZServer does."""
        result = {}
        worker = threading.Thread(
            target=lambda: result.setdefault("body", stream_response(request, producer)),
            daemon=True,
        )
        worker.start()
        return worker, result

    def test_chunks_reach_the_client_while_the_producer_runs(self):
        sock, fake = self.connect()
        request = ZServerRequest(fake, self.server)
        gate, cleanups = threading.Event(), []

        def producer(guard):
            guard.add_cleanup(lambda: cleanups.append(guard.reason.value))
            yield b"first\n"
            while not gate.is_set():
                if guard.wait(0.05):
                    return
            yield b"second\n"

        worker, result = self.serve(request, producer)
        read_until(sock, b"first\n")
        self.assertTrue(worker.is_alive())
        gate.set()
        read_until(sock, b"second\n")
        worker.join(5)
        self.assertFalse(worker.is_alive())
        self.assertEqual(result["body"], "")
        self.assertEqual(cleanups, ["finished"])
        self.assertEqual(request.response.headers["x-accel-buffering"], "no")

    def test_client_leaving_stops_the_producer_and_frees_the_worker(self):
        sock, fake = self.connect()
        request = ZServerRequest(fake, self.server)
        cleanups, finally_ran = [], []

        def producer(guard):
            guard.add_cleanup(lambda: cleanups.append(guard.reason.value))
            try:
                n = 0
                while True:  # never asks the guard: the guard stops it
                    n += 1
                    yield f"line {n}\n".encode()
                    threading.Event().wait(0.01)
            finally:
                finally_ran.append(True)

        worker, _ = self.serve(request, producer)
        read_until(sock, b"line 3\n")
        sock.close()
        worker.join(5)
        self.assertFalse(worker.is_alive(), "the worker thread is still streaming")
        self.assertEqual(cleanups, ["client gone"])
        self.assertEqual(finally_ran, [True])
        self.assertEqual(live_streams.live(), [])
