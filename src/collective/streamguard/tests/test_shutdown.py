"""Server shutdown ends live streams, and their cleanups run once.

Zope's own ``runwsgi`` (what ``make run`` starts) serves a throw-away Zope
instance in a subprocess; a client keeps a stream open while the process is
stopped with SIGTERM (process managers) or SIGINT (Ctrl-C).  Streams that
hold their thread and parked streams (no thread, watched by the hub) alike.
"""

import json
import os
import signal
import subprocess
import sys
import unittest

from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import http_request
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.helpers import wait_until_serving
from collective.streamguard.tests.servers import executable
from collective.streamguard.tests.servers import free_port
from collective.streamguard.tests.zopeinstance import ZopeInstance


class TestProcessShutdown(unittest.TestCase):
    def setUp(self):
        self.port = free_port()
        self.instance = ZopeInstance(self.port)
        self.addCleanup(self.instance.remove)
        from Zope2.utilities.mkwsgiinstance import write_inituser

        write_inituser(os.path.join(self.instance.home, "inituser"), "admin", "admin")
        self.output = open(os.path.join(self.instance.home, "var", "runwsgi.out"), "w+")
        self.addCleanup(self.output.close)
        self.process = subprocess.Popen(
            [executable("runwsgi"), self.instance.zope_ini],
            env={**os.environ, **self.instance.env},
            stdout=self.output,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(self.kill)
        wait_until_serving(self.port, self.process)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stream_then_stop(self, signum):
        sock = HTTPClient((HOST, self.port)).request(
            "/@@streamguard-test-stream?tag=live&mode=idle"
        )
        with sock:
            read_until(sock, b"first line of live")
            self.process.send_signal(signum)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.fail("runwsgi did not stop within 20 s")
        cleanups = self.instance.events("cleanup", tag="live")
        self.output.seek(0)
        log = self.output.read()[-2000:]
        self.assertEqual([c["reason"] for c in cleanups], ["shutdown"], log)
        self.assertEqual(len(self.instance.events("producer-finally", tag="live")), 1)
        with open(self.instance.event_log) as f:
            self.assertIn("ended (shutdown)", f.read())

    def test_sigterm_runs_the_cleanups_of_live_streams(self):
        self.stream_then_stop(signal.SIGTERM)

    def parked_count(self):
        status, _, body = http_request(
            (HOST, self.port), "/@@stream-status?format=json", auth=("admin", "admin")
        )
        self.assertEqual(status, 200)
        return json.loads(body)["parked"]

    def test_sigterm_ends_parked_streams_and_runs_their_cleanups(self):
        # The first request a server publishes lets it park streams: a page.
        self.assertEqual(self.parked_count(), 0)
        # Two: anonymous streams count per client address (2 at most).
        tags = [f"parked-{n}" for n in range(2)]
        clients = []
        for tag in tags:
            client = HTTPClient((HOST, self.port))
            self.addCleanup(client.close)
            client.request(f"/@@streamguard-test-stream?tag={tag}&mode=idle")
            client.read_until(f"first line of {tag}".encode())
            clients.append(client)
        self.assertTrue(wait_for(lambda: self.parked_count() == len(tags)))
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.fail("runwsgi did not stop within 20 s")
        self.output.seek(0)
        log = self.output.read()[-2000:]
        for tag in tags:
            cleanups = self.instance.events("cleanup", tag=tag)
            self.assertEqual([c["reason"] for c in cleanups], ["shutdown"], log)
            self.assertEqual(len(self.instance.events("producer-finally", tag=tag)), 1)
        for client in clients:
            self.assertTrue(client.closed())

    def test_sigint_runs_the_cleanups_of_live_streams(self):
        self.stream_then_stop(signal.SIGINT)


if sys.platform != "linux":  # pragma: no cover
    del TestProcessShutdown
