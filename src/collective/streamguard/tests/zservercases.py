"""The test base for the real classic ZServer (``STREAMGUARD_ZSERVER_TESTING``).

Clients are ``helpers.HTTPClient``.  Views run in ZServer's PubCore worker
threads; ``views.HoldView`` leaves what it saw in ``views.HELD``.  Every
wait has a deadline: the asyncore thread flips ``channel.closed`` a moment
after a probe may already have seen the socket closed.
"""

import contextlib
import threading
import unittest
import uuid

from collective.streamguard import probes
from collective.streamguard import watcher
from collective.streamguard.streams import live_streams
from collective.streamguard.testing import STREAMGUARD_ZSERVER_TESTING
from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import wait_for

SOON = 10.0  # generous: a bound that only a broken probe misses


def open_channels():
    """ZServer's HTTP channels in ``asyncore.socket_map``."""
    import asyncore

    return [
        channel
        for channel in list(asyncore.socket_map.values())
        if type(channel).__name__ == "zhttp_channel"
    ]


def channel_of_client(client):
    """The channel ZServer accepted for ``client`` (by its port), or None."""
    port = client.sock.getsockname()[1]
    for channel in open_channels():
        if channel.addr[1] == port:
            return channel
    return None


class ZServerTestCase(unittest.TestCase):
    layer = STREAMGUARD_ZSERVER_TESTING

    def setUp(self):
        if self.layer["zserver_skip"]:
            self.skipTest(self.layer["zserver_skip"])
        self.clients = []
        self.tags = []
        probes._warned_ambiguous = False

    def tearDown(self):
        for client in self.clients:
            client.close()
        for tag in self.tags:
            views.gate(tag).set()
        # Every held view returns, and no stream is left for the next test:
        # both ZServer workers are free again.
        self.assertTrue(
            wait_for(
                lambda: all("released" in views.HELD.get(t, {"released": 1}) for t in self.tags)
            ),
            "a held view did not return",
        )
        self.assertTrue(wait_for(lambda: not live_streams.live()), live_streams.live())
        # Nor a channel: the scan tests match every channel from 127.0.0.1
        # opened in the same second, a closing one of the last test too.
        self.assertTrue(wait_for(lambda: not open_channels(), SOON), open_channels())
        watcher.stop()

    @property
    def server(self):
        return self.layer["zserver"]

    def connect(self):
        client = HTTPClient((self.layer["host"], self.layer["port"]), timeout=SOON)
        self.clients.append(client)
        return client

    def leave(self, *clients):
        """Close ``clients`` and wait until ZServer has closed their channels."""
        channels = [channel_of_client(client) for client in clients]
        for client in clients:
            client.close()
        self.assertTrue(
            wait_for(lambda: not [c for c in channels if c is not None and not c.closed], SOON)
        )

    def tag(self):
        tag = uuid.uuid4().hex[:12]
        self.tags.append(tag)
        return tag

    def hold(self, client=None, probe=True):
        """Send ``GET @@streamguard-test-hold``; return (client, what the view saw)."""
        client = client or self.connect()
        tag = self.tag()
        client.request(f"/@@streamguard-test-hold?tag={tag}" + ("" if probe else "&probe=0"))
        if not wait_for(lambda: tag in views.HELD, SOON):
            client.closed(0.5)
            self.fail(f"the view did not run; the server sent {bytes(client.transcript)!r:.1000}")
        return client, views.HELD[tag]

    def release(self, held):
        views.gate(held["tag"]).set()

    def channel_of(self, held):
        return held["channel"]

    def in_loop(self, function):
        """Run ``function`` in ZServer's asyncore thread, through ZServer's
        own trigger (``ZEvent.Wakeup``), and wait for it."""
        from ZServer.PubCore.ZEvent import Wakeup

        done = threading.Event()
        result = []
        Wakeup(lambda: (result.append(function()), done.set()))
        self.assertTrue(done.wait(SOON), "the asyncore thread did not run the call")
        return result[0]

    @contextlib.contextmanager
    def asyncore_paused(self):
        """Keep ZServer's asyncore thread busy: it reads no socket meanwhile."""
        from ZServer.PubCore.ZEvent import Wakeup

        paused, resume = threading.Event(), threading.Event()
        Wakeup(lambda: (paused.set(), resume.wait(SOON * 3)))
        self.assertTrue(paused.wait(SOON), "the asyncore thread did not pause")
        try:
            yield
        finally:
            resume.set()

    def assert_becomes(self, connection, state, timeout=SOON):
        wait_for(lambda: connection.state().state is state, timeout)
        self.assertIs(connection.state().state, state)
