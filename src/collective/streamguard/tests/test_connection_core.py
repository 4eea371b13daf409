"""The core's API on plain sockets: input handling, caching, verdicts, the
fd-reuse guard and thread safety.  The servers themselves are exercised in
test_connection_servers."""

import dataclasses
import gc
import os
import select
import socket
import threading
import time
import unittest
import weakref

from collective.streamguard import ConnectionState
from collective.streamguard import Verdict
from collective.streamguard import client_connection
from collective.streamguard import connection_state
from collective.streamguard import is_browser_connection_open
from collective.streamguard import on_disconnect
from collective.streamguard import wait_for_disconnect
from collective.streamguard.connection import ENVIRON_KEY
from collective.streamguard.connection import ClientConnection
from collective.streamguard.connection import keep_alive
from collective.streamguard.probes import FdConnection
from collective.streamguard.probes import socket_is_open
from collective.streamguard.tests.helpers import SocketTestCase
from collective.streamguard.tests.helpers import blocked_at
from collective.streamguard.tests.helpers import reset
from collective.streamguard.tests.helpers import wait_for


class Request:
    """Anything with a dict ``environ`` is a request to the core (as Zope's
    HTTPRequest is)."""

    def __init__(self, environ):
        self.environ = environ


class InputTests(unittest.TestCase):
    def test_none_is_a_type_error(self):
        with self.assertRaisesRegex(
            TypeError, "needs a Zope request or a WSGI environ, got NoneType"
        ):
            client_connection(None)

    def test_object_without_environ_is_a_type_error(self):
        for bad in (object(), Request(None), Request([("a", 1)]), "environ"):
            with self.subTest(bad=bad), self.assertRaises(TypeError):
                is_browser_connection_open(bad)

    def test_environ_without_server_keys_reads_unknown_as_open(self):
        verdict = connection_state({"REQUEST_METHOD": "GET"})
        self.assertEqual(verdict, Verdict(ConnectionState.UNKNOWN, "none"))
        self.assertTrue(verdict)
        self.assertTrue(is_browser_connection_open({}))
        self.assertTrue(client_connection({}).is_open())

    def test_unknown_wait_returns_false_after_the_timeout(self):
        started = time.monotonic()
        self.assertFalse(wait_for_disconnect({}, 0))
        self.assertLess(time.monotonic() - started, 0.1)
        started = time.monotonic()
        self.assertFalse(wait_for_disconnect({}, 0.3))
        self.assertGreaterEqual(time.monotonic() - started, 0.29)

    def test_unknown_on_close_never_fires(self):
        handle = on_disconnect({}, self.fail)
        self.assertFalse(handle.fired)
        self.assertFalse(handle.cancel())


class VerdictTests(unittest.TestCase):
    def test_only_closed_is_false(self):
        self.assertTrue(Verdict(ConnectionState.OPEN, "waitress"))
        self.assertTrue(Verdict(ConnectionState.UNKNOWN, "none"))
        self.assertFalse(Verdict(ConnectionState.CLOSED, "waitress"))

    def test_frozen(self):
        with self.assertRaises(dataclasses.FrozenInstanceError):
            Verdict(ConnectionState.OPEN, "x").state = ConnectionState.CLOSED


class CacheTests(SocketTestCase):
    def test_cached_in_the_environ(self):
        server, _ = self.pair()
        environ = {"gunicorn.socket": server}
        connection = client_connection(environ)
        self.assertIs(environ[ENVIRON_KEY], connection)
        self.assertIs(client_connection(Request(environ)), connection)
        self.assertIsNot(client_connection({"gunicorn.socket": server}), connection)

    def test_keeps_no_reference_to_the_request(self):
        server, _ = self.pair()
        request = Request({"gunicorn.socket": server})
        connection = client_connection(request)
        gone = weakref.ref(request)
        del request
        gc.collect()
        self.assertIsNone(gone())
        self.assertTrue(connection.is_open())


class SocketProbeTests(SocketTestCase):
    def test_open_idle_and_with_unread_bytes(self):
        server, client = self.pair()
        self.assertTrue(socket_is_open(server))
        client.sendall(b"GET /next HTTP/1.1\r\n\r\n")
        self.assertTrue(select.select([server], [], [], 10)[0], "the bytes did not arrive")
        self.assertTrue(socket_is_open(server))

    def test_fin_behind_unread_bytes(self):
        server, client = self.pair()
        client.sendall(b"GET /next HTTP/1.1\r\n\r\n")
        client.shutdown(socket.SHUT_WR)
        self.assertTrue(wait_for(lambda: not socket_is_open(server)), "the FIN was not seen")
        # What a one-byte peek sees: data, so "open".
        self.assertEqual(server.recv(1, socket.MSG_PEEK), b"G")

    def test_reset(self):
        server, client = self.pair()
        reset(client)
        self.assertTrue(wait_for(lambda: not socket_is_open(server)), "the reset was not seen")

    def test_the_servers_own_shutdown_of_its_sending_side_is_still_open(self):
        # TCP's state is FIN_WAIT: the peer may still read and send.
        server, client = self.pair()
        server.shutdown(socket.SHUT_WR)
        self.assertEqual(client.recv(1), b"")  # our FIN arrived
        self.assertTrue(socket_is_open(server))
        client.close()
        self.assertTrue(wait_for(lambda: not socket_is_open(server)), "the FIN was not seen")

    def test_ipv6(self):
        try:
            listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
        except OSError as error:  # pragma: no cover (a host without IPv6)
            self.skipTest(f"no IPv6 loopback: {error}")
        with listener:
            client = socket.create_connection(listener.getsockname()[:2])
            server, _ = listener.accept()
        self.assert_open_until_the_peer_closes(server, client)

    def test_a_unix_socket_is_polled(self):
        # TCP_INFO is TCP's: a Unix socket is asked with poll(), as before.
        self.assert_open_until_the_peer_closes(*socket.socketpair())

    def assert_open_until_the_peer_closes(self, server, client):
        self.sockets += [server, client]
        self.assertTrue(socket_is_open(server))
        client.close()
        self.assertTrue(wait_for(lambda: not socket_is_open(server)), "the close was not seen")

    def test_closed_by_the_server(self):
        server, _ = self.pair()
        server.close()
        self.assertFalse(socket_is_open(server))
        self.assertFalse(socket_is_open(None))

    def test_closed_stays_closed(self):
        server, client = self.pair()
        connection = client_connection({"gunicorn.socket": server})
        client.close()
        self.assertTrue(wait_for(lambda: not connection.is_open()))
        # Even if the socket object somehow looked open again.
        connection._sock = self.pair()[0]
        self.assertFalse(connection.is_open())

    def test_http2_socket_open_is_unknown(self):
        # gunicorn's HTTP/2 multiplexes requests on one socket: an open
        # socket says nothing about this request's stream.
        server, client = self.pair()
        environ = {"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/2.0"}
        self.assertEqual(connection_state(environ).state, ConnectionState.UNKNOWN)
        client.close()
        self.assertTrue(wait_for(lambda: connection_state(environ).state is ConnectionState.CLOSED))


class FdProbeTests(SocketTestCase):
    """uWSGI gives only an int fd."""

    def test_fin_and_reset(self):
        server, client = self.pair()
        connection = FdConnection(server.fileno(), "uwsgi")
        self.assertTrue(connection.is_open())
        self.assertEqual(connection.fileno(), server.fileno())
        client.close()
        self.assertTrue(connection.wait_closed(5))

    def test_reused_fd_reads_closed_for_the_old_request(self):
        old_server, _ = self.pair()
        fd = old_server.fileno()
        old = FdConnection(fd, "uwsgi")
        new_server, _ = self.pair()
        # The server closes the old connection and the next accept() gets
        # the same number: dup2 makes that happen deterministically.
        os.dup2(new_server.fileno(), fd)
        new = FdConnection(fd, "uwsgi")
        self.assertEqual(new.state().state, ConnectionState.OPEN)
        self.assertEqual(old.state().state, ConnectionState.CLOSED)
        self.assertEqual(old.fileno(), -1)

    def test_closed_fd(self):
        server, _ = self.pair()
        connection = FdConnection(server.fileno(), "uwsgi")
        server.close()
        self.assertFalse(connection.is_open())
        self.assertFalse(FdConnection(server.fileno(), "uwsgi").is_open())


class ThreadTests(SocketTestCase):
    def test_state_and_wait_closed_from_different_threads(self):
        # select.poll objects must not be polled from two threads at once.
        server, client = self.pair()
        connection = client_connection({"gunicorn.socket": server})
        errors = []
        results = []

        def waiter():
            try:
                results.append(connection.wait_closed(5))
            except Exception as exc:  # pragma: no cover - the failure case
                errors.append(exc)

        threads = [threading.Thread(target=waiter) for _ in range(3)]
        for thread in threads:
            thread.start()
        for _ in range(2000):
            self.assertTrue(connection.is_open())
        client.close()
        for thread in threads:
            thread.join(5)
            self.assertFalse(thread.is_alive())
        self.assertEqual((errors, results), ([], [True, True, True]))

    def test_wait_closed_wakes_when_the_server_closes_the_socket(self):
        # Closing an fd does not wake a poll() in another thread; the
        # waiter's periodic re-check must notice.
        server, _ = self.pair()
        connection = client_connection({"gunicorn.socket": server})
        result = []
        thread = threading.Thread(target=lambda: result.append(connection.wait_closed(10)))
        thread.start()
        # Closed only once the waiter sleeps in its poll.
        self.assertTrue(
            wait_for(lambda: blocked_at(thread, ClientConnection.wait_closed, "poller.poll("))
        )
        server.close()
        thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertEqual(result, [True])


class TestVanishedPeerBound(unittest.TestCase):
    """A vanished peer is found within 50 s whatever the stream sends: for a
    stream that beats, the user timeout counts from its first unanswered
    heartbeat, so it is shortened by the heartbeat interval."""

    def tcp_pair(self):
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)
        return server

    def user_timeout(self, sock):
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)

    def test_a_quiet_stream_keeps_the_50_s_user_timeout(self):
        sock = self.tcp_pair()
        self.assertTrue(keep_alive(sock.fileno()))
        self.assertEqual(self.user_timeout(sock), 50_000)
        self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))

    def test_a_stream_that_beats_every_15_s_times_out_35_s_after_a_beat(self):
        sock = self.tcp_pair()
        self.assertTrue(keep_alive(sock.fileno(), sends_every=15))
        self.assertEqual(self.user_timeout(sock), 35_000)

    def test_the_user_timeout_never_drops_below_10_s(self):
        sock = self.tcp_pair()
        self.assertTrue(keep_alive(sock.fileno(), sends_every=45))
        self.assertEqual(self.user_timeout(sock), 10_000)

    def test_a_connection_with_the_socket_object_sets_them_on_it(self):
        sock = self.tcp_pair()
        connection = client_connection({"gunicorn.socket": sock})
        self.assertTrue(connection.keep_alive(sends_every=15))
        self.assertEqual(self.user_timeout(sock), 35_000)
        self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        sock.close()
        self.assertFalse(connection.keep_alive())

    def test_a_unix_socket_is_left_alone(self):
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        self.assertFalse(client_connection({"gunicorn.socket": ours}).keep_alive())
        self.assertFalse(keep_alive(ours.fileno()))
