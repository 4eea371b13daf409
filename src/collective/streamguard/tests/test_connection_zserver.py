"""The classic ZServer probes, against the real ZServer 4.0.2 (``zservercases``).

The views run in ZServer's PubCore workers; the channels, ``socket_map``,
``creation_time`` and close handling are ZServer's and asyncore's own.
"""

import socket
import threading
import time
import warnings

from collective.streamguard import ConnectionState
from collective.streamguard import client_connection
from collective.streamguard.tests.helpers import sweeps_later
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.zservercases import SOON
from collective.streamguard.tests.zservercases import ZServerTestCase
from collective.streamguard.tests.zservercases import channel_of_client
from collective.streamguard.watcher import _current as _current_watcher

with warnings.catch_warnings():
    # Deprecated since 3.6, removed in 3.12; ZServer is built on it.
    warnings.simplefilter("ignore", DeprecationWarning)
    import asyncore

OPEN, CLOSED, UNKNOWN = ConnectionState.OPEN, ConnectionState.CLOSED, ConnectionState.UNKNOWN


def naive_is_browser_connection_open(environ):
    """The scan of socket_map passed around for ZServer, for comparison."""
    from ZServer.HTTPServer import zhttp_channel

    creation_time = environ["channel.creation_time"]
    for cnxn in list(asyncore.socket_map.values()):
        if isinstance(cnxn, zhttp_channel) and cnxn.creation_time == creation_time:
            return True
    return False


class ExactChannelTests(ZServerTestCase):
    """Given the request, the probe finds its own channel through
    ``response.stdout._channel``: exact and O(1)."""

    def test_request_finds_its_channel(self):
        from ZServer.HTTPServer import zhttp_channel

        _, held = self.hold()
        connection = held["connection"]
        channel = self.channel_of(held)
        self.assertIsInstance(channel, zhttp_channel)
        self.assertIs(asyncore.socket_map[channel._fileno], channel)
        self.assertEqual(connection.probe, "zserver-channel")
        self.assertIs(connection.state().state, OPEN)
        self.assertEqual(connection.fileno(), channel.socket.fileno())
        # What the environ-only scan matches on.
        self.assertIsInstance(held["environ"]["channel.creation_time"], int)
        self.assertEqual(held["environ"]["channel.creation_time"], channel.creation_time)
        self.assertEqual(held["environ"]["REMOTE_ADDR"], channel.addr[0])
        self.assertTrue(held["thread"].startswith("ZServer worker"), held["thread"])

    def assert_leaving_is_seen(self, leave):
        client, held = self.hold()
        channel = self.channel_of(held)
        leave(client)
        self.assert_becomes(held["connection"], CLOSED)
        # The view, in its worker, saw it too, and returned.
        self.assertTrue(wait_for(lambda: held.get("released"), SOON))
        self.assertEqual(held["released"], "client gone")
        # ZServer's asyncore thread closes the channel a moment later.
        self.assertTrue(wait_for(lambda: channel.closed, SOON))
        self.assertTrue(wait_for(lambda: channel not in asyncore.socket_map.values(), SOON))

    def test_client_fin_reads_closed(self):
        self.assert_leaving_is_seen(lambda client: client.close())

    def test_client_reset_reads_closed(self):
        self.assert_leaving_is_seen(lambda client: client.reset())

    def test_half_closed_client_reads_closed(self):
        self.assert_leaving_is_seen(lambda client: client.shutdown(socket.SHUT_WR))

    def test_fin_the_asyncore_thread_has_not_read_reads_closed(self):
        # While the asyncore thread is busy the channel stays in socket_map,
        # not closed, so the naive scan still says open; the socket itself
        # knows better, even behind a pipelined request.
        client, held = self.hold()
        channel = self.channel_of(held)
        with self.asyncore_paused():
            client.request("/next")
            client.shutdown(socket.SHUT_WR)
            self.assert_becomes(held["connection"], CLOSED)
            self.assertFalse(channel.closed)
            self.assertIs(asyncore.socket_map.get(channel._fileno), channel)
            self.assertTrue(naive_is_browser_connection_open(held["environ"]))
        self.assertTrue(wait_for(lambda: channel.closed, SOON))

    def test_server_closing_the_channel_reads_closed(self):
        # kill_zombies, or a shutdown: channel.close() in the asyncore
        # thread while the client is still there.
        _, held = self.hold()
        self.in_loop(self.channel_of(held).close)
        self.assertIs(held["connection"].state().state, CLOSED)

    def test_wait_closed_and_on_close(self):
        client, held = self.hold()
        connection = held["connection"]
        called, fired = [], threading.Event()
        connection.on_close(lambda: (called.append(1), fired.set()))
        self.assertFalse(connection.wait_closed(0.1))
        client.close()
        started = time.monotonic()
        self.assertTrue(connection.wait_closed(SOON))
        self.assertLess(time.monotonic() - started, SOON)
        self.assertTrue(fired.wait(SOON))
        # A whole sweep after the call, which asks every entry again: a
        # second call would come in it.
        self.assertTrue(sweeps_later(_current_watcher(), timeout=SOON))
        self.assertEqual(called, [1])

    def test_finished_response_falls_back_to_the_scan(self):
        # ZServerHTTPResponse._finish drops response.stdout (and the pipe
        # its _channel): then only the environ is left to go by.
        client, held = self.hold(probe=False)
        self.release(held)
        client.read_until(b"released: gate\n")
        request = held["request"]
        self.assertTrue(wait_for(lambda: request.response.stdout is None, SOON))
        connection = client_connection(request)
        self.assertEqual(connection.probe, "zserver-scan")
        self.assertIs(connection.state().state, OPEN)  # keep-alive: still there
        client.close()
        self.assert_becomes(connection, CLOSED)


class ScanTests(ZServerTestCase):
    """Given only the environ, the probe scans ``socket_map`` for channels
    with the request's creation second and REMOTE_ADDR."""

    def answered(self, client=None):
        """A request answered on a kept-alive connection; (client, held)."""
        client, held = self.hold(client)
        self.release(held)
        client.read_until(b"released: gate\n")
        return client, held

    def scan(self, held):
        connection = client_connection(dict(held["environ"]))
        self.assertEqual(connection.probe, "zserver-scan")
        return connection

    def test_one_match_pins_its_channel_until_the_client_leaves(self):
        client, held = self.answered()
        connection = self.scan(held)
        self.assertIs(connection.state().state, OPEN)
        self.assertEqual(connection.fileno(), self.channel_of(held).socket.fileno())
        client.close()
        self.assert_becomes(connection, CLOSED)

    def test_no_match_reads_closed(self):
        _, held = self.answered()
        environ = dict(held["environ"])
        environ["channel.creation_time"] -= 3600
        self.assertIs(client_connection(environ).state().state, CLOSED)
        environ = dict(held["environ"], REMOTE_ADDR="127.0.0.2")
        self.assertIs(client_connection(environ).state().state, CLOSED)

    def two_in_one_second(self):
        """Two answered keep-alive connections that ZServer accepted in the
        same second: [(client, held), (client, held)]."""
        for _attempt in range(5):
            clients = [self.connect(), self.connect()]
            pair = [self.answered(client) for client in clients]
            times = {held["environ"]["channel.creation_time"] for _, held in pair}
            if len(times) == 1:
                return pair
            self.leave(*clients)
        self.fail("could not open two connections within one second")

    def test_two_matches_read_open_and_warn_once(self):
        (_, first), (_, second) = self.two_in_one_second()
        with self.assertLogs("collective.streamguard", "WARNING") as logged:
            by_environ = self.scan(first)
            self.assertIs(by_environ.state().state, OPEN)
            self.assertIs(self.scan(second).state().state, OPEN)
        self.assertEqual(len(logged.records), 1)
        self.assertIn("same second", logged.records[0].getMessage())

    def test_ambiguous_scan_never_pins_the_channel_left_over(self):
        # The first look finds two channels; when the first client leaves,
        # the only match left is the second client's.  Pinning it would read
        # the second client's connection as exactly this request's.
        (first_client, first), (second_client, second) = self.two_in_one_second()
        by_environ = self.scan(first)
        self.assertIs(by_environ.state().state, OPEN)
        first_channel = self.channel_of(first)
        first_client.close()
        self.assertTrue(wait_for(lambda: first_channel.closed, SOON))
        self.assertIs(by_environ.state().state, OPEN)  # cannot tell: conservative
        self.assertEqual(by_environ.fileno(), -1, "pinned the other client's channel")
        second_client.close()
        self.assert_becomes(by_environ, CLOSED)

    def test_a_channel_opened_after_the_first_look_never_counts(self):
        for _attempt in range(5):
            (first_client, first), (second_client, _) = self.two_in_one_second()
            by_environ = self.scan(first)  # the first look: two candidates
            late = self.connect()
            self.assertTrue(wait_for(lambda late=late: channel_of_client(late), SOON))
            late_channel = channel_of_client(late)
            if late_channel.creation_time == first["environ"]["channel.creation_time"]:
                break
            self.leave(first_client, second_client, late)
        else:
            self.fail("could not open three connections within one second")
        self.assertTrue(naive_is_browser_connection_open(first["environ"]))
        first_client.close()
        second_client.close()
        # Both candidates gone: closed, although a third channel of that
        # second and address is open.
        self.assert_becomes(by_environ, CLOSED)
        self.assertFalse(late_channel.closed)

    def test_clock_server_request_reads_unknown(self):
        # ZServer's clock server publishes with a DummyChannel (never in
        # socket_map) and a float creation_time.
        from ZServer.ClockServer import ClockServer

        clock = ClockServer("/@@streamguard-test-probe", period=3600, host="localhost")
        try:
            _, request, _ = clock.get_requests_and_response()
        finally:
            clock.close()
        self.assertIsInstance(request.environ["channel.creation_time"], float)
        verdict = client_connection(request).state()
        self.assertEqual((verdict.state, verdict.probe), (UNKNOWN, "zserver-clock"))
        self.assertTrue(verdict)
        self.assertFalse(client_connection(request).wait_closed(0))
