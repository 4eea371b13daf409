"""Guarded streaming on the real classic ZServer: ``response.write()`` in the worker.

``stream_response`` sees ZServer's ``ChannelPipe`` and pushes the stream
with ``ZServerHTTPResponse.write`` from the PubCore worker that runs the
view (``streaming.write_in_this_thread``); the guard's probe of the channel
is what stops the producer, since ZServer drops data for a closed channel
without raising.  The layer runs ZServer's default two worker threads.
"""

import sys
from unittest import mock

from collective.streamguard import streaming
from collective.streamguard.streams import live_streams
from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.zservercases import SOON
from collective.streamguard.tests.zservercases import ZServerTestCase

STREAM = "/@@streamguard-test-stream"


class WriteModeTests(ZServerTestCase):
    def open(self, query):
        client = self.connect()
        return client.request(f"{STREAM}?{query}")

    def assert_cleaned_up_once(self, tag, reason):
        self.assertTrue(wait_for(lambda: views.events("cleanup", tag=tag), SOON), tag)
        # A second cleanup would come while the stream is still ending.
        self.assertTrue(wait_for(lambda: not live_streams.live(), SOON), live_streams.live())
        self.assertEqual([e["reason"] for e in views.events("cleanup", tag=tag)], [reason])

    def assert_both_workers_free(self):
        """Two views that hold their worker both run: no worker streams."""
        helds = [self.hold()[1] for _ in range(2)]
        self.assertNotEqual(helds[0]["thread"], helds[1]["thread"])
        for held in helds:
            self.release(held)

    def test_chunks_reach_the_client_while_the_producer_runs(self):
        tag = self.tag()
        client = self.open(f"tag={tag}&mode=gated")
        status, headers = client.head()
        client.read_until(f"first line of {tag}\n".encode())
        # The first line arrived while the producer waits at its gate.
        self.assertEqual(status, 200)
        self.assertEqual(headers["transfer-encoding"], "chunked")
        self.assertNotIn("content-length", headers)
        self.assertEqual(headers["x-accel-buffering"], "no")
        self.assertEqual(headers["cache-control"], "no-store")
        self.assertEqual(len(live_streams.live()), 1)
        self.assertFalse(views.events("cleanup", tag=tag))
        views.gate(tag).set()
        body = client.body()
        self.assertEqual(body, f"first line of {tag}\nafter the gate\n".encode())
        self.assert_cleaned_up_once(tag, "finished")

    def test_finished_stream_keeps_the_connection_alive(self):
        tag = self.tag()
        client = self.open(f"tag={tag}&mode=finish")
        self.assertEqual(client.body(), f"first line of {tag}\nsecond\nthird\n".encode())
        self.assert_cleaned_up_once(tag, "finished")
        # The next request on the same connection is served.
        _, held = self.hold(client)
        self.release(held)
        client.read_until(b"released: gate\n")

    def assert_leaving_frees_the_worker(self, mode, leave):
        tag = self.tag()
        client = self.open(f"tag={tag}&mode={mode}")
        client.read_until(b"line 3\n" if mode == "long" else f"first line of {tag}\n".encode())
        leave(client)
        self.assert_cleaned_up_once(tag, "client gone")
        self.assertEqual(len(views.events("producer-finally", tag=tag)), 1)
        self.assert_both_workers_free()
        return tag

    def test_client_fin_stops_an_idle_stream_and_frees_the_worker(self):
        self.assert_leaving_frees_the_worker("idle", lambda client: client.close())

    def test_client_reset_stops_an_idle_stream_and_frees_the_worker(self):
        self.assert_leaving_frees_the_worker("idle", lambda client: client.reset())

    def test_client_leaving_a_busy_stream_closes_the_generator(self):
        # The producer never asks the guard; the guard stops it at a yield.
        tag = self.assert_leaving_frees_the_worker("long", lambda client: client.close())
        self.assertEqual(len(views.events("generator-exit", tag=tag)), 1)


class ThreadPoolTests(ZServerTestCase):
    """ZServer's workers are ``zserver-threads`` (2 here), not waitress' 4:
    one stream at most, so that one worker always serves pages."""

    def test_cap_is_zserver_threads_minus_one(self):
        _, held = self.hold()
        self.release(held)
        self.assertEqual(streaming.server_threads(held["environ"]), 2)
        self.assertEqual(streaming.default_max_streams(held["environ"]), 1)

    def test_cap_follows_zserver_threads(self):
        config = sys.modules["ZServer.Zope2.Startup.config"]
        environ = {"channel.creation_time": 1, "REMOTE_ADDR": "127.0.0.1"}
        with mock.patch.object(config, "ZSERVER_THREADS", 6):
            self.assertEqual(streaming.default_max_streams(environ), 5)

    def test_second_stream_is_refused_and_pages_still_answer(self):
        tag = self.tag()
        streaming_client = self.connect().request(f"{STREAM}?tag={tag}&mode=idle")
        streaming_client.read_until(f"first line of {tag}\n".encode())
        refused = self.connect().request(
            f"{STREAM}?tag={self.tag()}", headers={"Connection": "close"}
        )
        status, headers = refused.head()
        self.assertEqual(status, 503)
        self.assertEqual(headers["retry-after"], "10")
        self.assertIn(b"Too many live streams", refused.body())
        # The other worker still serves pages.
        _, held = self.hold()
        self.release(held)
        streaming_client.close()
        self.assertTrue(wait_for(lambda: views.events("cleanup", tag=tag), SOON))
        self.assertTrue(wait_for(lambda: not live_streams.live(), SOON))
        again = self.connect().request(f"{STREAM}?tag={self.tag()}&mode=finish")
        self.assertEqual(again.head()[0], 200)
        again.body()
