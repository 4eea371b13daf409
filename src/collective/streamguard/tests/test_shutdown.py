"""Server shutdown ends live streams, and their cleanups run once.

Zope's own ``runwsgi`` (what ``make run`` starts) serves a throw-away Zope
instance in a subprocess; a client keeps a stream open while the process is
stopped with SIGTERM (process managers) or SIGINT (Ctrl-C).
"""

import os
import signal
import subprocess
import sys
import unittest

from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.helpers import wait_until_serving
from collective.streamguard.tests.servers import executable
from collective.streamguard.tests.servers import free_port
from collective.streamguard.tests.zopeinstance import ZopeInstance


class TestProcessShutdown(unittest.TestCase):
    def setUp(self):
        self.port = free_port()
        self.instance = ZopeInstance(self.port)
        self.addCleanup(self.instance.remove)
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

    def test_sigint_runs_the_cleanups_of_live_streams(self):
        self.stream_then_stop(signal.SIGINT)


if sys.platform != "linux":  # pragma: no cover
    del TestProcessShutdown
