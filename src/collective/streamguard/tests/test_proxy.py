"""Clients behind a reverse proxy: per-client limits see the real client.

Anonymous streams count per client address.  Behind a balancer every
request comes from the balancer's address, unless waitress is told to
trust it: ``trusted_proxy`` (the balancer's address),
``trusted_proxy_headers = x-forwarded-for`` and
``clear_untrusted_proxy_headers = true``.  Then REMOTE_ADDR is the client's,
from the header the balancer sets, and a header sent by anybody else is
dropped.  Here a real waitress is configured so; 127.0.0.2 plays the
balancer (loopback has every 127.x address).
"""

from plone.app.testing import FunctionalTesting

from collective.streamguard.streams import live_streams
from collective.streamguard.testing import TEST_VIEWS_FIXTURE
from collective.streamguard.testing import WaitressServer
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import StreamingTestCase

BALANCER = "127.0.0.2"

BEHIND_A_BALANCER = FunctionalTesting(
    bases=(
        TEST_VIEWS_FIXTURE,
        WaitressServer(
            name="StreamGuardWaitress:behind-a-balancer",
            trusted_proxy=BALANCER,
            trusted_proxy_headers="x-forwarded-for",
            clear_untrusted_proxy_headers=True,
        ),
    ),
    name="StreamGuardTestViewsLayer:BehindABalancer",
)


class TestClientsBehindTheBalancer(StreamingTestCase):
    layer = BEHIND_A_BALANCER

    def setUp(self):
        super().setUp()
        self.configure(max_streams_per_user=1)

    def stream(self, source, forwarded_for):
        client = self.connect_from(source)
        tag = self.tag()
        client.request(
            f"/plone/@@streamguard-test-stream?tag={tag}&mode=idle",
            headers={"X-Forwarded-For": forwarded_for},
        )
        return client, tag

    def connect_from(self, source):
        from collective.streamguard.tests.helpers import HTTPClient

        client = HTTPClient((self.layer["host"], self.layer["port"]), source=source)
        self.sockets.append(client)
        return client

    def clients_of_live_streams(self):
        return sorted(record.client for record in live_streams.live())

    def test_two_clients_behind_the_balancer_have_their_own_limits(self):
        first, tag = self.stream(BALANCER, "198.51.100.1")
        first.read_until(f"first line of {tag}".encode())
        second, tag = self.stream(BALANCER, "198.51.100.2")
        second.read_until(f"first line of {tag}".encode())
        self.assertEqual(self.clients_of_live_streams(), ["198.51.100.1", "198.51.100.2"])
        # The first client's second stream is over its own limit (1).
        third, _ = self.stream(BALANCER, "198.51.100.1")
        self.assertEqual(third.head()[0], 429)
        for client in (first, second):
            client.close()
        self.assertTrue(wait_for(lambda: not live_streams.live()))

    def test_a_forged_header_from_a_client_that_is_not_the_balancer_changes_nothing(self):
        first, tag = self.stream("127.0.0.3", "198.51.100.9")
        first.read_until(f"first line of {tag}".encode())
        self.assertEqual(self.clients_of_live_streams(), ["127.0.0.3"])
        # Another forged address from the same client: the same client.
        second, _ = self.stream("127.0.0.3", "198.51.100.8")
        self.assertEqual(second.head()[0], 429)
        first.close()
        self.assertTrue(wait_for(lambda: not live_streams.live()))
