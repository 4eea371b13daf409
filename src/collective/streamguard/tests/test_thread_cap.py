"""The thread cap cannot be fooled: every stream that holds a worker thread
counts, on a real Plone site served by a real waitress with 4 threads.

A plain iterable never sees its guard and can never park: it counts from
the start and the one past the cap is refused before its first byte.  A
producer that takes the guard but keeps its thread without parking (busy,
or sleeping outside ``guard.idle()``) counts once it has kept it for
``HOLD_GRACE``; when no thread is left for it, it ends as failed, and its
client can tell: no clean end of a text body, an ``error`` event for SSE.
"""

from collective.streamguard.streams import live_streams
from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import AllLogLines
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import StreamingTestCase

PLAIN_PATH = "/plone/@@streamguard-test-plain"


def held_slots():
    return live_streams.snapshot()["reserved_held"]


class TestThreadCap(StreamingTestCase):
    def setUp(self):
        super().setUp()
        # The first request a waitress server publishes lets it park streams
        # (parking.install_on_first_request): make sure it was not a stream.
        status, _, _ = self.get("/plone")
        self.assertEqual(status, 200)

    def anonymous_client(self, address):
        client = HTTPClient((self.layer["host"], self.layer["port"]), source=address)
        self.sockets.append(client)
        return client

    def assert_page_answers(self):
        status, _, _ = self.get("/plone")
        self.assertEqual(status, 200)

    def assert_cut_off(self, sock):
        """The server closed without the chunked body's terminating chunk."""
        with self.assertRaisesRegex(AssertionError, "server closed before the body ended"):
            sock.body()

    def test_plain_generators_past_the_cap_are_refused_before_their_first_byte(self):
        for mode in ("sleep", "wait_closed"):
            with self.subTest(mode=mode):
                # Four anonymous clients from four addresses: each address
                # has a user limit of its own (2), so only the thread cap
                # (4 threads - 1) can refuse the fourth.
                tags = [self.tag() for _ in range(4)]
                socks = []
                for n, tag in enumerate(tags[:3]):
                    sock = self.anonymous_client(f"127.0.0.{n + 1}")
                    sock.request(f"{PLAIN_PATH}?tag={tag}&mode={mode}")
                    sock.read_until(f"first line of {tag}".encode())
                    socks.append(sock)
                self.assertEqual(held_slots(), 3)
                fourth = self.anonymous_client("127.0.0.4")
                fourth.request(f"{PLAIN_PATH}?tag={tags[3]}&mode={mode}")
                status, headers = fourth.head()
                self.assertEqual(status, 503)
                self.assertEqual(headers["retry-after"], "10")
                self.assertEqual(views.events("start", tag=tags[3]), [])
                self.assert_page_answers()
                for sock in socks:
                    sock.close()
                for tag in tags[:3]:
                    self.assertTrue(
                        wait_for(lambda tag=tag: views.events("producer-finally", tag=tag))
                    )
                self.assertTrue(wait_for(lambda: not live_streams.live()), live_streams.live())

    def test_busy_streams_count_once_they_keep_their_thread(self):
        self.configure(max_streams_per_user=0)
        tags = [self.tag() for _ in range(3)]
        socks = [self.open(f"tag={tag}&mode=busy") for tag in tags]
        for sock, tag in zip(socks, tags, strict=True):
            sock.read_until(f"first line of {tag}".encode())
        # Counted once each has kept its thread for HOLD_GRACE.
        self.assertTrue(wait_for(lambda: held_slots() == 3), live_streams.snapshot())
        # The fourth takes the last thread; once it has kept it too, it ends
        # as failed, and its client sees no clean end of the body.
        fourth = self.tag()
        sock = self.open(f"tag={fourth}&mode=busy")
        sock.read_until(f"first line of {fourth}".encode())
        self.assert_cut_off(sock)
        self.assert_cleaned_up_once(fourth, "error")
        self.assert_page_answers()
        # An SSE stream in its place gets an error event before the close.
        fifth = self.tag()
        sock = self.open(f"tag={fifth}&mode=busy&type=text/event-stream")
        sock.read_until(b"event: error\ndata: ")
        self.assert_cut_off(sock)
        self.assert_cleaned_up_once(fifth, "error")
        for sock in socks:
            sock.close()
        for tag in tags:
            self.assert_cleaned_up_once(tag, "client gone")

    def test_a_stream_that_blocks_in_wait_with_no_thread_left_is_cut_off(self):
        self.configure(max_streams_per_user=0)
        tags = [self.tag() for _ in range(3)]
        socks = [self.open(f"tag={tag}&mode=gated") for tag in tags]
        for sock, tag in zip(socks, tags, strict=True):
            sock.read_until(f"first line of {tag}".encode())
        # Each holds once it blocks in guard.wait(), just after its line.
        self.assertTrue(wait_for(lambda: held_slots() == 3), live_streams.snapshot())
        fourth = self.tag()
        sock = self.open(f"tag={fourth}&mode=gated")
        sock.read_until(f"first line of {fourth}".encode())
        self.assert_cut_off(sock)
        self.assert_cleaned_up_once(fourth, "error")
        for tag in tags:
            views.gate(tag).set()
        for tag in tags:
            self.assert_cleaned_up_once(tag, "finished")

    def test_a_producer_error_is_logged_once_and_cuts_the_response(self):
        lines = AllLogLines.attach(self)
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=error&type=text/event-stream")
        sock.read_until(b"event: error\ndata: ")
        self.assert_cut_off(sock)
        self.assert_cleaned_up_once(tag, "error")
        failures = [line for line in lines.texts if "the producer failed on purpose" in line]
        self.assertEqual(len(failures), 1, lines.texts)

    def test_a_producer_that_uses_the_requests_objects_is_told_of_zodb_true(self):
        lines = AllLogLines.attach(self)
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=stale")
        sock.read_until(f"first line of {tag}".encode())
        self.assert_cut_off(sock)
        self.assert_cleaned_up_once(tag, "error")
        # ZODB logs its own traceback; the add-on adds one line, saying
        # what to do.
        hints = [line for line in lines.texts if "zodb=True" in line]
        self.assertEqual(len(hints), 1, lines.texts)
        self.assertIn("ConnectionStateError", hints[0])
        self.assertIn("pass zodb=True and context= to stream_response()", hints[0])
        self.assertNotIn("Traceback", hints[0])
