"""The Zope WSGI app on gunicorn and uWSGI, installed from PyPI by ``make test``.

Each layer serves a throw-away Zope instance (``zopeinstance.ZopeInstance``,
no Plone) through ``zopeapp:application`` on one real server in a
subprocess: gunicorn's sync worker (one thread: a stream holds the whole
worker), gunicorn's gthread worker, and uWSGI with ``--http-socket``
(a connection per request) and ``--http11-socket`` (keep-alive), both with
4 threads.  uWSGI lends the app only an int fd, valid in the request's own
thread: ``stream_response`` captures it in the view, and the guard polls it
from the thread that iterates the body, so no other thread (and no
``--enable-threads``) is needed for a stream to stop.

The producers of ``views.StreamView`` report to the instance's events file.
"""

import os
import socket
import sys
import unittest
import uuid

from collective.streamguard.tests import helpers
from collective.streamguard.tests import servers
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.zopeinstance import ZopeInstance

APP = "collective.streamguard.tests.zopeapp:application"
SOON = 10.0  # generous: a bound that only a broken probe misses


def import_path():
    """The test process's own import path, minus the standard library.

    Under ``make test`` the server scripts live in the same venv and find
    Zope themselves.  Under buildout a script sees only its own eggs
    (gunicorn's script: gunicorn), so the Zope app's eggs go on PYTHONPATH.
    """
    stdlib = os.path.realpath(sys.base_prefix)
    return [
        p for p in sys.path if p and os.path.isdir(p) and not os.path.realpath(p).startswith(stdlib)
    ]


class ZopeServerLayer(servers.ServerLayer):
    """A ``ZopeInstance`` served by one ``servers.Server``.

    ``servers.ServerLayer``'s set-up counting and skipping, without its
    ``EventSink``: the Zope test views report to the instance's events file.
    """

    __module__ = __name__

    def __init__(self, name, kind, **options):
        super().__init__(name, kind, options=options, app=APP, module=__name__)
        self.instance = None

    def make_server(self):
        # The port is runwsgi's (zope.ini); this server picks its own.
        self.instance = ZopeInstance(0)
        env = dict(self.instance.env)
        env.pop("PYTHONPATH")  # Server builds it from pythonpath
        return servers.Server(
            self.kind,
            app=self.app,
            options=self.options,
            env=env,
            pythonpath=import_path(),
            directory=os.path.join(self.instance.home, "var"),
            ready_path="/",
            ready_body=None,
        )

    def dispose(self):
        if self.instance is not None:
            self.instance.remove()
        self.instance = None


class ZopeServerContract(servers.LayerTestCase):
    """What a Zope view sees on every supported server.  Subclasses set
    ``layer`` and the ``probe`` name the add-on must pick there."""

    probe = None

    def setUp(self):
        super().setUp()
        self.server = self.layer.server
        self.instance = self.layer.instance
        self.tags = []

    def tearDown(self):
        # No stream may outlive its test: gunicorn's sync worker serves one
        # request at a time, and the cap is 3 streams per process.
        for tag in self.tags:
            self.assertTrue(
                wait_for(lambda tag=tag: self.instance.events("cleanup", tag=tag)),
                f"stream {tag} never ended\n{self.server.log_tail()}",
            )

    # helpers

    def get(self, path):
        status, _, body = helpers.http_request(self.server.address, path, timeout=SOON)
        return status, body.decode()

    def open_stream(self, mode):
        tag = uuid.uuid4().hex[:12]
        self.tags.append(tag)
        sock = servers.connect(self.server)
        self.addCleanup(sock.close)
        sock.sendall(servers.request_bytes(f"/@@streamguard-test-stream?tag={tag}&mode={mode}"))
        head = helpers.read_until(sock, f"first line of {tag}\n".encode())
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head[:200])
        if mode == "idle":
            # Let the producer reach guard.idle(): a client leaving before
            # the server asks for the next chunk is caught by the guard's
            # check in front of it instead (both are asserted below).
            self.assertTrue(wait_for(lambda: self.instance.events("idle", tag=tag), SOON))
        return sock, tag, head

    def assert_ended_once(self, tag, reason):
        cleanups = wait_for(lambda: self.instance.events("cleanup", tag=tag))
        self.assertEqual([c["reason"] for c in cleanups], [reason], self.server.log_tail())
        # The thread (the whole worker, on gunicorn sync) is free again: the
        # next request is served, and the stream did not end a second time.
        self.assertEqual(self.get("/@@streamguard-test-probe")[0], 200)
        self.assertEqual(len(self.instance.events("cleanup", tag=tag)), 1)
        self.assertEqual(len(self.instance.events("producer-finally", tag=tag)), 1)

    def assert_stopped_by_guard(self, tag):
        """The guard, not a failed write, stopped the idle producer: either
        ``guard.idle()`` returned True, or the client left before the
        producer was resumed and it was closed at its first yield."""
        idle = [e["stopped"] for e in self.instance.events("idle-returned", tag=tag)]
        exits = self.instance.events("generator-exit", tag=tag)
        self.assertIn((idle, len(exits)), [([True], 0), ([], 1)])

    # the contract

    def test_view_sees_its_connection_open_through_the_server_probe(self):
        status, body = self.get("/@@streamguard-test-probe")
        self.assertEqual((status, body), (200, f"open {self.probe}\n"))

    def test_idle_stream_ends_when_client_closes(self):
        sock, tag, _ = self.open_stream("idle")
        sock.close()
        self.assert_ended_once(tag, "client gone")
        self.assert_stopped_by_guard(tag)

    def test_idle_stream_ends_when_client_half_closes(self):
        sock, tag, _ = self.open_stream("idle")
        sock.shutdown(socket.SHUT_WR)
        self.assert_ended_once(tag, "client gone")
        self.assert_stopped_by_guard(tag)

    def test_idle_stream_ends_when_client_resets(self):
        sock, tag, _ = self.open_stream("idle")
        helpers.reset(sock)
        self.assert_ended_once(tag, "client gone")
        self.assert_stopped_by_guard(tag)

    def test_stream_that_finishes_ends_finished(self):
        sock, tag, head = self.open_stream("finish")
        if b"third\n" not in head:
            helpers.read_until(sock, b"third\n")
        # Leave only once the stream has ended: a client leaving before the
        # server asks for the end of the body would make it "client gone".
        # (gunicorn's sync worker lingers up to 2 s for a client that stays.)
        self.assertTrue(wait_for(lambda: self.instance.events("cleanup", tag=tag)))
        sock.close()
        self.assert_ended_once(tag, "finished")
        self.assertEqual(self.instance.events("generator-exit", tag=tag), [])
        self.assertEqual(self.instance.events("idle-returned", tag=tag), [])


ZOPE_GUNICORN_SYNC = ZopeServerLayer("ZOPE_GUNICORN_SYNC", "gunicorn", worker_class="sync")
ZOPE_GUNICORN_GTHREAD = ZopeServerLayer(
    "ZOPE_GUNICORN_GTHREAD", "gunicorn", worker_class="gthread", threads=4
)
ZOPE_UWSGI_HTTP = ZopeServerLayer("ZOPE_UWSGI_HTTP", "uwsgi", threads=4)
ZOPE_UWSGI_HTTP11 = ZopeServerLayer("ZOPE_UWSGI_HTTP11", "uwsgi", threads=4, keepalive=True)


class ZopeOnGunicornSyncTests(ZopeServerContract, unittest.TestCase):
    """One worker, one thread: a live stream holds the whole worker."""

    layer = ZOPE_GUNICORN_SYNC
    probe = "gunicorn"


class ZopeOnGunicornGthreadTests(ZopeServerContract, unittest.TestCase):
    layer = ZOPE_GUNICORN_GTHREAD
    probe = "gunicorn"


class ZopeOnUwsgiHttpSocketTests(ZopeServerContract, unittest.TestCase):
    layer = ZOPE_UWSGI_HTTP
    probe = "uwsgi"


class ZopeOnUwsgiHttp11SocketTests(ZopeServerContract, unittest.TestCase):
    layer = ZOPE_UWSGI_HTTP11
    probe = "uwsgi"
