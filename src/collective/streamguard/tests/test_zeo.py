"""Scaled out on ZEO: a stream's own transaction, seen from another instance.

A real ZEO server (``runzeo``) and two Zope instances (Zope's ``runwsgi``)
as its clients, all subprocesses on loopback.  A producer on instance A
writes in its own connection and transaction; instance B sees the write
when the producer finished, and never when the client left first.
"""

import os
import subprocess
import unittest

from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import http_request
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.helpers import wait_until_serving
from collective.streamguard.tests.servers import executable
from collective.streamguard.tests.servers import free_port
from collective.streamguard.tests.servers import stop_processes
from collective.streamguard.tests.zopeinstance import ZopeInstance


class ZEOLayer:
    """runzeo plus two runwsgi instances, started once for the tests."""

    __bases__ = ()
    __module__ = __name__
    __name__ = "ZEO_TWO_INSTANCES"

    def setUp(self):
        self.processes = []
        self.zeo_port = free_port()
        self.zeo_home = ZopeInstance(free_port())  # only for its temp dir
        zeo = subprocess.Popen(
            [
                executable("runzeo"),
                "-a",
                f"{HOST}:{self.zeo_port}",
                "-f",
                os.path.join(self.zeo_home.home, "var", "zeo.fs"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(zeo)
        wait_until_serving(self.zeo_port, zeo, timeout=30.0, path=None)
        self.instances = []
        for _name in "ab":
            port = free_port()
            instance = ZopeInstance(port, zeo=f"{HOST}:{self.zeo_port}")
            process = subprocess.Popen(
                [executable("runwsgi"), instance.zope_ini],
                env={**os.environ, **instance.env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.processes.append(process)
            instance.port = port
            self.instances.append(instance)
            wait_until_serving(port, process)

    def tearDown(self):
        stop_processes(self.processes)
        for instance in self.instances:
            instance.remove()
        self.zeo_home.remove()


ZEO_TWO_INSTANCES = ZEOLayer()


class TestStreamsOnZEO(unittest.TestCase):
    layer = ZEO_TWO_INSTANCES

    def mark_seen_by(self, instance):
        status, _, body = http_request(
            (HOST, instance.port), "/@@streamguard-test-mark", timeout=10
        )
        self.assertEqual(status, 200, body)
        return body.decode()

    def stream(self, instance, query):
        sock = HTTPClient((HOST, instance.port))
        self.addCleanup(sock.close)
        return sock.request(f"/@@streamguard-test-zodb?{query}")

    def test_finished_stream_commits_and_the_other_instance_sees_it(self):
        a, b = self.layer.instances
        sock = self.stream(a, "tag=committed&mode=write&finish=1")
        sock.body()
        self.assertTrue(wait_for(lambda: a.events("cleanup", tag="committed")))
        self.assertEqual(a.events("cleanup", tag="committed")[0]["reason"], "finished")
        # B's connection catches ZEO's invalidation at its next transaction.
        self.assertTrue(wait_for(lambda: self.mark_seen_by(b) == "committed", 10))

    def test_client_leaving_aborts_and_the_other_instance_never_sees_it(self):
        a, b = self.layer.instances
        sock = self.stream(a, "tag=aborted&mode=write")
        read_until(sock, b"marked")
        sock.close()
        self.assertTrue(wait_for(lambda: a.events("cleanup", tag="aborted")))
        self.assertEqual(a.events("cleanup", tag="aborted")[0]["reason"], "client gone")
        self.assertNotEqual(self.mark_seen_by(b), "aborted")
        self.assertNotEqual(self.mark_seen_by(a), "aborted")
