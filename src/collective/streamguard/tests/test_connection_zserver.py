"""The classic ZServer probes, against the ZServer stand-in (``zserver_standin``)."""

import socket
import threading
import time

from collective.streamguard import ConnectionState
from collective.streamguard import client_connection
from collective.streamguard.tests.zserver_standin import ZServerContractTestCase
from collective.streamguard.tests.zserver_standin import asyncore
from collective.streamguard.tests.zserver_standin import zhttp_channel


def naive_is_browser_connection_open(request):
    """A naive scan of socket_map (the recipe passed around for ZServer), for comparison."""
    creation_time = request.environ["channel.creation_time"]
    for cnxn in asyncore.socket_map.values():
        if isinstance(cnxn, zhttp_channel) and cnxn.creation_time == creation_time:
            return True
    return False


class ExactChannelTests(ZServerContractTestCase):
    """Given the request, the probe finds its own channel through
    ``response.stdout._channel``: exact and O(1)."""

    def test_request_finds_its_channel(self):
        _, request = self.connect()
        connection = client_connection(request)
        self.assertEqual(connection.probe, "zserver-channel")
        self.assertEqual(connection.state().state, ConnectionState.OPEN)
        self.assertEqual(connection.fileno(), request.response.stdout._channel.socket.fileno())

    def test_stream_ends_when_asyncore_thread_reads_the_fin(self):
        sock, request = self.connect()
        connection = client_connection(request)
        channel = request.response.stdout._channel
        sock.close()
        self.assert_becomes(connection, ConnectionState.CLOSED)
        deadline = time.monotonic() + 5
        while not channel.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertTrue(channel.closed)

    def test_stream_ends_on_a_fin_nobody_has_read(self):
        # The channel stays in socket_map, not closed, so the naive scan
        # still says open; the socket itself knows better.
        sock, request = self.connect()
        channel = request.response.stdout._channel
        self.in_loop(lambda: setattr(channel, "reading", False))
        connection = client_connection(request)
        sock.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        self.assert_becomes(connection, ConnectionState.CLOSED)
        self.assertFalse(channel.closed)
        self.assertTrue(naive_is_browser_connection_open(request))

    def test_stream_ends_when_server_closes_the_channel(self):
        # kill_zombies, or a server shutdown: channel.close() in the
        # asyncore thread; the client is still there.
        _, request = self.connect()
        connection = client_connection(request)
        self.in_loop(request.response.stdout._channel.close)
        self.assertEqual(connection.state().state, ConnectionState.CLOSED)

    def test_wait_closed_and_on_close(self):
        sock, request = self.connect()
        connection = client_connection(request)
        called = []
        fired = threading.Event()
        connection.on_close(lambda: (called.append(1), fired.set()))
        self.assertFalse(connection.wait_closed(0.1))
        sock.close()
        started = time.monotonic()
        self.assertTrue(connection.wait_closed(5))
        self.assertLess(time.monotonic() - started, 5)
        self.assertTrue(fired.wait(5))
        time.sleep(1.2)  # past a watcher sweep
        self.assertEqual(called, [1])

    def test_finished_response_falls_back_to_the_scan(self):
        # ChannelPipe.close() drops _channel when the response is done.
        _, request = self.connect()
        request.response.stdout.close()
        connection = client_connection(request)
        self.assertEqual(connection.probe, "zserver-scan")
        self.assertEqual(connection.state().state, ConnectionState.OPEN)


class ScanTests(ZServerContractTestCase):
    """Given only the environ, the probe scans ``socket_map`` by creation time,
    matching creation second and REMOTE_ADDR."""

    def test_one_match_reads_open_until_client_leaves(self):
        sock, request = self.connect()
        connection = client_connection(dict(request.environ))
        self.assertEqual(connection.probe, "zserver-scan")
        self.assertEqual(connection.state().state, ConnectionState.OPEN)
        sock.close()
        self.assert_becomes(connection, ConnectionState.CLOSED)

    def test_no_match_reads_closed(self):
        _, request = self.connect()
        environ = dict(request.environ)
        environ["channel.creation_time"] -= 3600
        self.assertEqual(client_connection(environ).state().state, ConnectionState.CLOSED)
        environ = dict(request.environ, REMOTE_ADDR="127.0.0.2")
        self.assertEqual(client_connection(environ).state().state, ConnectionState.CLOSED)

    def connect_twice_in_one_second(self):
        for _attempt in range(5):
            first_sock, first = self.connect()
            second_sock, second = self.connect()
            if first.environ == second.environ:
                return (first_sock, first), (second_sock, second)
        self.fail("could not open two connections within one second")

    def test_two_matches_read_open_and_warn_once(self):
        (first_sock, first), (_, second) = self.connect_twice_in_one_second()
        with self.assertLogs("collective.streamguard", "WARNING") as logged:
            by_environ = client_connection(dict(first.environ))
            self.assertEqual(by_environ.state().state, ConnectionState.OPEN)
            self.assertEqual(
                client_connection(dict(second.environ)).state().state,
                ConnectionState.OPEN,
            )
            self.assertEqual(by_environ.state().state, ConnectionState.OPEN)
        self.assertEqual(len(logged.records), 1)
        self.assertIn("same second", logged.records[0].getMessage())
        # The first client leaves: its environ cannot tell (the second
        # channel matches too), its request can.
        by_request = client_connection(first)
        first_sock.close()
        self.assert_becomes(by_request, ConnectionState.CLOSED)
        self.assertEqual(by_environ.state().state, ConnectionState.OPEN)

    def test_clock_server_request_reads_unknown(self):
        # ZServer's clock server: a fake channel with a float creation_time,
        # never in socket_map.
        environ = {"channel.creation_time": time.time(), "REMOTE_ADDR": "127.0.0.1"}
        verdict = client_connection(environ).state()
        self.assertEqual((verdict.state, verdict.probe), (ConnectionState.UNKNOWN, "zserver-clock"))
        self.assertTrue(verdict)
        self.assertFalse(client_connection(environ).wait_closed(0))
