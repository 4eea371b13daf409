"""Guarded streaming on a real Plone site served by a real waitress (4 threads).

Clients are raw sockets: the tests need to read a response while it is
still being produced, and to leave with a FIN or a reset.
"""

from collective.streamguard.streams import live_streams
from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.helpers import reset
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.helpers import wait_gone
from collective.streamguard.tests.streamcases import StreamingTestCase


class TestStreamsReallyStream(StreamingTestCase):
    def assert_streams(self, content_type):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=gated&type={content_type}")
        head = read_until(sock, f"first line of {tag}".encode())
        # The first line arrived while the producer is still waiting at the
        # gate: the response is streamed, not buffered by Zope or Plone.
        self.assertFalse(views.events("cleanup", tag=tag))
        headers = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        self.assertIn("transfer-encoding: chunked", headers)
        self.assertNotIn("content-length", headers)
        self.assertIn("cache-control: no-store", headers)
        self.assertIn("x-accel-buffering: no", headers)
        self.assertIn("x-content-type-options: nosniff", headers)
        self.assertIn(f"content-type: {content_type}", headers)
        views.gate(tag).set()
        body = sock.body()
        self.assertIn(b"after the gate", body)
        self.assert_cleaned_up_once(tag, "finished")
        return body

    def test_text_plain_streams(self):
        self.assert_streams("text/plain")

    def test_event_stream_streams(self):
        self.assert_streams("text/event-stream")

    def test_text_html_streams_past_theming_and_transforms(self):
        body = self.assert_streams("text/html")
        # Diazo would have wrapped the body in the theme's page.
        self.assertNotIn(b"<html", body.lower())


class TestEndReasons(StreamingTestCase):
    def test_client_fin_stops_the_producer_and_cleans_up_once(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=idle")
        read_until(sock, f"first line of {tag}".encode())
        sock.close()
        self.assert_cleaned_up_once(tag, "client gone")
        # The producer was stopped inside its wait, with GeneratorExit or
        # by the wait returning; its own finally ran once either way.
        self.assertEqual(len(views.events("producer-finally", tag=tag)), 1)

    def test_client_reset_stops_the_producer(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=idle")
        read_until(sock, f"first line of {tag}".encode())
        self.sockets.remove(sock)
        reset(sock)
        self.assert_cleaned_up_once(tag, "client gone")

    def test_client_leaving_a_busy_stream_closes_the_generator(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=long")
        read_until(sock, b"line 5\n")
        sock.close()
        self.assert_cleaned_up_once(tag, "client gone")
        self.assertEqual(len(views.events("generator-exit", tag=tag)), 1)

    def test_finished_producer(self):
        tag = self.tag()
        status, headers, body = self.get(f"/plone/@@streamguard-test-stream?tag={tag}&mode=finish")
        self.assertEqual(status, 200)
        self.assertEqual(body, f"first line of {tag}\nsecond\nthird\n".encode())
        self.assert_cleaned_up_once(tag, "finished")

    def test_producer_error_is_logged_and_cuts_the_response(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=error")
        read_until(sock, f"first line of {tag}".encode())
        # The server drops the connection without the final chunk: the
        # client can tell the response is incomplete.
        self.assertTrue(wait_gone(sock))
        with self.assertRaisesRegex(AssertionError, "server closed before the body ended"):
            sock.body()
        self.assert_cleaned_up_once(tag, "error")

    def test_maximum_duration(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=idle&max_duration=0.5")
        sock.body(timeout=10)
        self.assert_cleaned_up_once(tag, "timeout")

    def test_shutdown_stops_live_streams(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=idle")
        read_until(sock, f"first line of {tag}".encode())
        try:
            self.assertEqual(live_streams.shutdown(timeout=5), 0)
        finally:
            live_streams.shutting_down.clear()
        self.assert_cleaned_up_once(tag, "shutdown")

    def test_end_reasons_are_counted(self):
        before = live_streams.snapshot()["ended"]["finished"]
        self.get(f"/plone/@@streamguard-test-stream?tag={self.tag()}&mode=finish")
        self.assertTrue(
            wait_for(lambda: live_streams.snapshot()["ended"]["finished"] == before + 1)
        )


class TestHeartbeat(StreamingTestCase):
    def test_idle_stream_sends_heartbeats(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=heartbeat&type=text/event-stream")
        # Two heartbeats in a row, each its own 13-byte (0xD) chunk.
        data = read_until(sock, b"D\r\n: heartbeat\n\n\r\nD\r\n: heartbeat\n\n", timeout=5)
        self.assertIn(f"first line of {tag}".encode(), data)
        sock.close()
        self.assert_cleaned_up_once(tag, "client gone")


class TestThreadPoolProtection(StreamingTestCase):
    def test_fourth_stream_is_refused_and_pages_still_answer(self):
        # Streams that do not park hold a thread each (parked streams:
        # test_parked_zope).
        self.configure(max_streams_per_user=0, park_streams=False)
        tags = [self.tag() for _ in range(3)]
        socks = [self.open(f"tag={tag}&mode=idle") for tag in tags]
        for sock, tag in zip(socks, tags, strict=True):
            read_until(sock, f"first line of {tag}".encode())
        status, headers, body = self.get(f"/plone/@@streamguard-test-stream?tag={self.tag()}")
        self.assertEqual(status, 503)
        self.assertEqual(headers["retry-after"], "10")
        self.assertIn(b"Too many live streams", body)
        # Three threads stream; the fourth still serves normal pages.
        status, _, _ = self.get("/plone")
        self.assertEqual(status, 200)
        for sock in socks:
            sock.close()
        for tag in tags:
            self.assert_cleaned_up_once(tag, "client gone")
        status, _, _ = self.get(f"/plone/@@streamguard-test-stream?tag={self.tag()}&mode=finish")
        self.assertEqual(status, 200)

    def test_one_user_gets_at_most_max_streams_per_user(self):
        self.configure(max_streams_per_user=1)
        mine = self.tag()
        sock = self.open(f"tag={mine}&mode=idle", auth=True)
        read_until(sock, f"first line of {mine}".encode())
        refused = self.open(f"tag={self.tag()}&mode=idle", auth=True)
        status, headers = refused.head()
        self.assertEqual(status, 429)
        self.assertEqual(headers["retry-after"], "10")
        self.assertIn(b"as many live streams open as one user may", refused.body())
        # Someone else (anonymous, by address) still gets a stream.
        other = self.tag()
        read_until(self.open(f"tag={other}&mode=idle"), f"first line of {other}".encode())
        self.assertEqual(live_streams.snapshot()["live"], 2)
