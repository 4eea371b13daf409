"""Guarded streaming on a real Plone site served by a real waitress (4 threads).

Clients are raw sockets: the tests need to read a response while it is
still being produced, and to leave with a FIN or a reset.
"""

import base64
import http.client
import socket
import time
import unittest
import uuid

from plone.app.testing import SITE_OWNER_NAME
from plone.app.testing import SITE_OWNER_PASSWORD

from collective.streamguard.streams import live_streams
from collective.streamguard.testing import STREAMGUARD_WAITRESS_TESTING
from collective.streamguard.tests import views
from collective.streamguard.tests.servers import read_until
from collective.streamguard.tests.servers import reset
from collective.streamguard.tests.servers import wait_for
from collective.streamguard.tests.servers import wait_gone


class StreamingTestCase(unittest.TestCase):
    layer = STREAMGUARD_WAITRESS_TESTING

    def setUp(self):
        self.sockets = []

    def tearDown(self):
        for sock in self.sockets:
            sock.close()
        # No test may leave a stream behind for the next one.
        self.assertTrue(wait_for(lambda: not live_streams.live(), 10), live_streams.live())

    def open(self, query, auth=False, path="/plone/@@streamguard-test-stream"):
        sock = socket.create_connection((self.layer["host"], self.layer["port"]), timeout=10)
        self.sockets.append(sock)
        headers = f"GET {path}?{query} HTTP/1.1\r\nHost: localhost\r\n"
        if auth:
            token = base64.b64encode(f"{SITE_OWNER_NAME}:{SITE_OWNER_PASSWORD}".encode())
            headers += f"Authorization: Basic {token.decode()}\r\n"
        sock.sendall((headers + "\r\n").encode())
        return sock

    def tag(self):
        return uuid.uuid4().hex[:12]

    def get(self, path):
        connection = http.client.HTTPConnection(self.layer["host"], self.layer["port"], timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def cleanups(self, tag):
        return views.events("cleanup", tag=tag)

    def assert_cleaned_up_once(self, tag, reason, timeout=10.0):
        self.assertTrue(wait_for(lambda: self.cleanups(tag), timeout), f"no cleanup for {tag}")
        time.sleep(0.2)  # a second cleanup would come right after the first
        found = self.cleanups(tag)
        self.assertEqual([c["reason"] for c in found], [reason])


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
        rest = read_until(sock, b"0\r\n\r\n")
        self.assertIn(b"after the gate", rest)
        self.assert_cleaned_up_once(tag, "finished")
        return head + rest

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
        data = read_until(sock, f"first line of {tag}".encode())
        # The server drops the connection without the final chunk: the
        # client can tell the response is incomplete.
        self.assertTrue(wait_gone(sock))
        self.assertNotIn(b"0\r\n\r\n", data)
        self.assert_cleaned_up_once(tag, "error")

    def test_maximum_duration(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=idle&max_duration=0.5")
        read_until(sock, b"0\r\n\r\n", timeout=10)
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
        tags = [self.tag() for _ in range(3)]
        socks = [self.open(f"tag={tag}&mode=idle") for tag in tags]
        for sock, tag in zip(socks, tags, strict=True):
            read_until(sock, f"first line of {tag}".encode())
        status, headers, body = self.get(f"/plone/@@streamguard-test-stream?tag={self.tag()}")
        self.assertEqual(status, 503)
        self.assertEqual(headers["Retry-After"], "10")
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
