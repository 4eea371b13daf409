"""The core against real servers, over real loopback sockets.

Each class runs one server in a subprocess (found next to sys.executable),
serving ``wsgiapps.app``; the app reports its probe verdicts over a unix
datagram side channel, and the test asks it for a verdict at any moment
through the control socket of the server process.
"""

import os
import socket
import time
import unittest
import uuid

from collective.streamguard.tests import helpers
from collective.streamguard.tests import servers

SOON = 5.0  # generous: a bound that only a broken probe misses


def fd_target(start):
    """What the fd of the request ``start`` reported is in its server
    process now (``socket:[inode]``), or None once it is closed."""
    try:
        return os.readlink(f"/proc/{start['pid']}/fd/{start['fd']}")
    except OSError:
        return None


class ServerContract(servers.LayerTestCase):
    """The behaviour every supported server must show.  Subclasses set
    ``layer`` (a ``servers.ServerLayer``) and the ``probe`` name to expect,
    and add ``KeepAliveContract`` or ``ConnectionPerRequestContract``: what
    the server does with a connection after a response decides which tests
    apply, so a test that cannot apply is not there (rather than skipped)."""

    probe = None

    @property
    def server(self):
        return self.layer.server

    @property
    def sink(self):
        return self.layer.sink

    def setUp(self):
        super().setUp()
        self.clients = []
        self.streams = {}  # rid -> ctl path of the process serving it
        self.ended = {}  # rid -> "end" event

    def tearDown(self):
        for sock in self.clients:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # closed by the test
        # Every stream must be over before the next test (gunicorn's sync
        # worker serves one at a time) and every connection closed by the
        # server (the fd-reuse test needs the server's fds settled).
        for rid, ctl in self.streams.items():
            self.sink.ask(ctl, "release", rid)
        for rid in self.streams:
            self.wait_end(rid)
        for sock in self.clients:
            if sock.fileno() >= 0:
                helpers.wait_gone(sock)
            sock.close()
        self.sink.collect()

    # helpers

    def rid(self):
        return uuid.uuid4().hex[:12]

    def connect(self):
        sock = servers.connect(self.server)
        self.clients.append(sock)
        return sock

    def open_stream(self, sock=None, mode="idle", **params):
        """Start a stream on ``sock`` (a new connection by default); return
        the socket and the app's "start" event once "ready" arrived."""
        sock = sock or self.connect()
        rid = self.rid()
        query = "&".join(f"{k}={v}" for k, v in dict(id=rid, mode=mode, **params).items())
        sock.sendall(servers.request_bytes(f"/stream?{query}"))
        helpers.read_until(sock, b"ready\n")
        start = self.sink.wait_for(event="start", id=rid)
        self.streams[rid] = start["ctl"]
        return sock, start

    def wait_end(self, rid):
        if rid not in self.ended:
            self.ended[rid] = self.sink.wait_for(event="end", id=rid)
        return self.ended[rid]

    def state(self, start):
        reply = self.sink.ask(start["ctl"], "state", start["id"])
        self.assertNotIn("error", reply)
        return reply

    def assert_becomes(self, start, expected):
        replies = []

        def reached():
            replies.append(self.state(start))
            return replies[-1]["state"] == expected

        helpers.wait_for(reached, SOON)
        reply = replies[-1]
        self.assertEqual(reply["state"], expected, reply)
        self.assertEqual(reply["probe"], self.probe)

    # the contract

    def test_idle_stream_reads_open(self):
        _, start = self.open_stream()
        self.assertEqual((start["state"], start["probe"]), ("open", self.probe))
        # Asked again after "ready" arrived: the server has sent the head and
        # the first body bytes since the probe first said open.
        self.assertEqual(self.state(start)["state"], "open")

    def test_idle_stream_with_pipelined_request_waiting_reads_open(self):
        sock, start = self.open_stream()
        sock.sendall(servers.request_bytes("/ping"))
        self.assertTrue(helpers.wait_for(lambda: helpers.delivered(sock)), "not delivered")
        self.assertEqual(self.state(start)["state"], "open")

    def test_idle_stream_ends_when_client_closes(self):
        sock, start = self.open_stream()
        sock.close()
        self.assert_becomes(start, "closed")

    def test_idle_stream_ends_when_client_half_closes(self):
        sock, start = self.open_stream()
        sock.shutdown(socket.SHUT_WR)
        self.assert_becomes(start, "closed")

    def test_idle_stream_ends_when_client_resets(self):
        sock, start = self.open_stream()
        helpers.reset(sock)
        self.assert_becomes(start, "closed")

    def test_idle_stream_ends_when_client_closes_after_pipelined_bytes(self):
        # The FIN sits behind unread bytes: a one-byte MSG_PEEK would see
        # only the bytes and call the connection open.
        sock, start = self.open_stream()
        sock.sendall(servers.request_bytes("/ping"))
        self.assertTrue(helpers.wait_for(lambda: helpers.delivered(sock)), "not delivered")
        self.assertEqual(self.state(start)["state"], "open")
        sock.shutdown(socket.SHUT_WR)
        self.assert_becomes(start, "closed")

    def test_wait_closed_returns_when_client_leaves(self):
        sock, start = self.open_stream(mode="wait", timeout=30)
        left_at = time.monotonic()
        sock.close()
        waited = self.sink.wait_for(event="waited", id=start["id"], timeout=SOON)
        self.assertTrue(waited["left"])
        self.assertEqual(waited["state"], "closed")
        self.assertLess(waited["t"] - left_at, SOON)

    def test_wait_closed_times_out_while_client_stays(self):
        sock, start = self.open_stream(mode="wait", timeout=0.3)
        waited = self.sink.wait_for(event="waited", id=start["id"])
        self.assertFalse(waited["left"])
        self.assertGreaterEqual(waited["elapsed"], 0.29)
        self.assertEqual(waited["state"], "open")
        sock.close()
        # Later waits (one per 0.3 s) until the client's leaving is seen.
        deadline = time.monotonic() + SOON
        while time.monotonic() < deadline:
            waited = self.sink.wait_for(event="waited", id=start["id"], timeout=SOON)
            if waited["left"]:
                break
        self.assertTrue(waited["left"])

    def test_on_close_callback_fires_exactly_once(self):
        sock, start = self.open_stream(callback=1)
        self.assertEqual(self.sink.collect(event="callback", id=start["id"]), [])
        sock.close()
        called = self.sink.wait_for(event="callback", id=start["id"], timeout=SOON)
        self.assertEqual(called["count"], 1)
        self.assertEqual(called["thread"], "collective.streamguard watcher")
        # Outlive a whole watcher sweep (two sweeps counted), which asks
        # every entry again: it must not call again.
        sweeps = self.state(start)["sweeps"]
        self.assertTrue(
            helpers.wait_for(lambda: self.state(start)["sweeps"] >= sweeps + 2, SOON),
            "the watcher stopped sweeping",
        )
        self.assertEqual(self.sink.collect(event="callback", id=start["id"]), [])
        self.assertEqual(self.state(start)["callbacks"], 1)

    def test_finished_request_reads_closed_once_its_connection_ended(self):
        sock = self.connect()
        rid = self.rid()
        sock.sendall(servers.request_bytes(f"/hold?id={rid}", close=True))
        helpers.read_until(sock, b"held\n")
        held = self.sink.wait_for(event="start", id=rid)
        # uWSGI's --http11-socket ignores the client's Connection: close and
        # keeps the socket until its 4 s timeout; a FIN ends it at once.
        sock.shutdown(socket.SHUT_WR)
        self.assertTrue(helpers.wait_gone(sock), "server did not close")
        self.assert_becomes(held, "closed")

    def test_new_connection_on_reused_fd_does_not_inherit(self):
        # The lowest free fd goes to the next accept(): close the old
        # connection, wait until the server let go of it, then connect.  A
        # connection of an earlier test that the server is still closing
        # can take the number first, hence a few tries.
        for _attempt in range(3):
            sock, old = self.open_stream(mode="wait", timeout=30)
            old_target = fd_target(old)
            sock.shutdown(socket.SHUT_WR)
            self.wait_end(old["id"])
            self.assertTrue(helpers.wait_gone(sock), "server did not close")
            # gunicorn half-closes first, then closes: wait until the
            # server's process let go of the fd (or gave it to another file).
            helpers.wait_for(lambda old=old, target=old_target: fd_target(old) != target, SOON)
            _, new = self.open_stream(compare=old["id"])
            if new["fd"] == old["fd"]:
                break
        self.assertEqual(new["fd"], old["fd"], "precondition: the fd was not reused")
        self.assertFalse(new["same_object"])
        self.assertEqual(new["state"], "open")
        self.assertEqual(new["compare"]["state"], "closed")
        self.assertEqual(self.state(old)["state"], "closed")
        self.assertEqual(self.state(new)["state"], "open")


class KeepAliveContract:
    """For servers that keep the connection open after a response: the
    next request on it must not inherit the first one's connection object."""

    def test_keep_alive_request_gets_its_own_connection_object(self):
        sock = self.connect()
        first = self.rid()
        sock.sendall(servers.request_bytes(f"/hold?id={first}"))
        helpers.read_until(sock, b"held\n")
        held = self.sink.wait_for(event="start", id=first)
        _, start = self.open_stream(sock, compare=first)
        # Same TCP connection: the held object of the finished first request
        # sees it open as well, but the second request has its own object.
        self.assertEqual(start["fd"], held["fd"])
        self.assertFalse(start["same_object"])
        self.assertEqual(start["state"], "open")
        self.assertEqual(start["compare"]["state"], "open")
        sock.close()
        self.assert_becomes(start, "closed")
        self.assert_becomes(held, "closed")


class ConnectionPerRequestContract:
    """For servers that close the connection after every response, which is
    why ``KeepAliveContract`` does not apply to them."""

    def test_server_closes_the_connection_after_a_response(self):
        sock = self.connect()
        sock.sendall(servers.request_bytes("/ping"))
        self.assertIn(b"pong", helpers.read_until(sock, b"pong"))
        # At once: keep-alive servers hold an idle connection for seconds.
        self.assertTrue(helpers.wait_gone(sock, timeout=1.0), "connection kept")


def layer(name, kind, **options):
    return servers.ServerLayer(name, kind, options, module=__name__)


WAITRESS_LOOKAHEAD_0 = layer(
    "WAITRESS_LOOKAHEAD_0", "waitress", threads=4, channel_request_lookahead=0
)
WAITRESS_LOOKAHEAD_1 = layer(
    "WAITRESS_LOOKAHEAD_1", "waitress", threads=4, channel_request_lookahead=1
)
GUNICORN_SYNC = layer("GUNICORN_SYNC", "gunicorn", worker_class="sync")
GUNICORN_GTHREAD = layer("GUNICORN_GTHREAD", "gunicorn", worker_class="gthread", threads=4)
UWSGI_HTTP11 = layer("UWSGI_HTTP11", "uwsgi", threads=4, keepalive=True)
UWSGI_HTTP = layer("UWSGI_HTTP", "uwsgi", threads=4)


class WaitressLookahead0Tests(ServerContract, KeepAliveContract, unittest.TestCase):
    """waitress' defaults: it does not read the socket while a request is
    in flight, so its own disconnect flag never flips for an idle stream."""

    layer = WAITRESS_LOOKAHEAD_0
    probe = "waitress"


class WaitressLookahead1Tests(ServerContract, KeepAliveContract, unittest.TestCase):
    """waitress reading ahead: its main thread may see the FIN first and
    close the socket under the probe."""

    layer = WAITRESS_LOOKAHEAD_1
    probe = "waitress"


class GunicornSyncTests(ServerContract, ConnectionPerRequestContract, unittest.TestCase):
    """The sync worker forces ``Connection: close``."""

    layer = GUNICORN_SYNC
    probe = "gunicorn"


class GunicornGthreadTests(ServerContract, KeepAliveContract, unittest.TestCase):
    layer = GUNICORN_GTHREAD
    probe = "gunicorn"


class UwsgiTests(ServerContract, KeepAliveContract, unittest.TestCase):
    """uWSGI with --http11-socket (keep-alive) and 4 threads: the probe has
    only an int fd, so fd reuse is the case that matters."""

    layer = UWSGI_HTTP11
    probe = "uwsgi"


class UwsgiHttpSocketTests(ServerContract, ConnectionPerRequestContract, unittest.TestCase):
    """uWSGI with plain --http-socket: a connection per request."""

    layer = UWSGI_HTTP
    probe = "uwsgi"
