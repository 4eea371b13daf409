"""@@stream-log on a real Plone site served by a real waitress (4 threads).

The log is a real file in a temp dir, configured in the registry; the test
appends to it, rotates it, swaps it, while raw-socket clients follow it.
"""

import json
import os
import re
import shutil
import socket

import transaction
from plone.app.testing import TEST_USER_NAME
from plone.app.testing import TEST_USER_PASSWORD

from collective.streamguard.logs.source import LogSource
from collective.streamguard.logs.stream import RETRY_RANGE
from collective.streamguard.permissions import VIEW_LOG_STREAMS
from collective.streamguard.streams import live_streams
from collective.streamguard.testing import set_product_config
from collective.streamguard.tests.helpers import Recorder
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import MARKER
from collective.streamguard.tests.streamcases import LogTestCase


class TestFollowing(LogTestCase):
    def test_appended_lines_reach_the_client(self):
        sock, head = self.follow()
        self.assertIn(b"Content-Type: text/plain; charset=utf-8", head)
        self.write("a new line\n")
        data = head + read_until(sock, b"a new line\n")
        self.assertNotIn(b"old line", data)  # started at the end
        self.write("another one\n")
        read_until(sock, b"another one\n")

    def test_headers_come_at_once_on_a_quiet_log(self):
        # Nothing is written to the log: without the headers a proxy in
        # front would answer 504 after its read timeout.
        sock, head = self.follow()
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(len(live_streams.live()), 1)

    def test_a_half_closed_client_gets_what_was_there_then_counts_as_gone(self):
        # The request, then shutdown of the sending side (nc -N): the last
        # lines were there when it asked, so it gets them; nginx and Go
        # would count such a client as gone at once, and past that so do we.
        recorder = Recorder.attach(self)
        sock = self.connect().request(
            "/plone/@@stream-log?log=app&lines=2", auth=("admin", "secret")
        )
        sock.shutdown(socket.SHUT_WR)
        self.assertEqual(sock.body(), b"first old line\nsecond old line\n")
        self.assertTrue(wait_for(lambda: recorder.ended))
        self.assertEqual(recorder.ended[0]["reason"], "client gone")

    def test_last_lines(self):
        sock, head = self.follow("log=app&lines=1")
        data = (
            head if b"second old line\n" in head else head + read_until(sock, b"second old line\n")
        )
        self.assertNotIn(b"first old line", data)

    def test_byte_offset(self):
        sock, head = self.follow("log=app&offset=6")
        data = (
            head if b"second old line\n" in head else head + read_until(sock, b"second old line\n")
        )
        self.assertIn(b"old line\nsecond", data)
        self.assertNotIn(b"first old", data)

    def test_end_marker_ends_the_stream_and_is_not_sent(self):
        sock, _ = self.follow()
        self.write(f"last words\n{MARKER}\nafter the marker\n")
        data = sock.body()
        self.assertIn(b"last words\n", data)
        self.assertNotIn(MARKER.encode(), data)
        self.assertNotIn(b"after the marker", data)
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        self.assertGreaterEqual(self.status_json()["ended"]["finished"], 1)

    def test_client_leaving_frees_the_thread(self):
        before = self.status_json()["ended"]["client gone"]
        sock, _ = self.follow()
        self.assertEqual(len(self.status_json()["live"]), 1)
        sock.close()
        self.assertTrue(wait_for(lambda: not live_streams.live(), 5))
        self.assertEqual(self.status_json()["ended"]["client gone"], before + 1)

    def test_maximum_duration(self):
        self.configure(max_duration=1)
        sock, _ = self.follow()
        sock.body(timeout=10)
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        self.assertGreaterEqual(self.status_json()["ended"]["timeout"], 1)

    def test_rotation_by_rename(self):
        sock, _ = self.follow()
        self.write("before rotation\n")
        read_until(sock, b"before rotation\n")
        os.rename(self.path, self.path + ".1")
        self.write("tail of the old file\n", path=self.path + ".1")
        self.write("in the new file\n", mode="w")
        data = read_until(sock, b"in the new file\n")
        self.assertIn(b"tail of the old file\n", data)

    def test_rotation_by_copytruncate(self):
        sock, _ = self.follow()
        self.write("before truncation\n")
        read_until(sock, b"before truncation\n")
        shutil.copy(self.path, self.path + ".1")
        os.truncate(self.path, 0)
        self.write("after truncation\n")
        read_until(sock, b"after truncation\n")

    def test_deletion_and_recreation(self):
        sock, _ = self.follow()
        source = LogSource.acquire(self.path)
        self.addCleanup(source.release)
        changes = source.changes
        os.unlink(self.path)
        # The new file comes only once inotify told the follower's source
        # that the name is gone.
        self.assertTrue(wait_for(lambda: source.changes != changes), "no change seen")
        self.write("a new file\n", mode="w")
        read_until(sock, b"a new file\n")

    def big_log(self):
        """About 6 MB of lines with UTF-8, CRLF and a few invalid bytes deep
        inside, then the end marker; the text a client must get."""
        lines = [
            f"{n} größe € 😀 line\r\n".encode() if n % 7 else f"{n} plain\n".encode()
            for n in range(200_000)
        ]
        lines[150_000] = b"bad \xff\xfe bytes\n"
        content = b"".join(lines)
        with open(self.path, "wb") as f:
            f.write(content + MARKER.encode() + b"\n")
        return content.decode("utf-8", "replace"), len(content)

    def read_to_the_end(self, query):
        recorder = Recorder.attach(self)
        sock = self.open(query, auth=True, path="/plone/@@stream-log")
        body = sock.body(timeout=30)
        self.assertTrue(wait_for(lambda: recorder.ended))
        return body, recorder.ended[0]

    def test_catch_up_of_a_large_log_is_exact(self):
        text, _size = self.big_log()
        body, ended = self.read_to_the_end("log=app&offset=0")
        self.assertEqual(body, text.encode())
        self.assertEqual(ended["reason"], "finished")
        # Caught up in 1 MiB pieces handed to waitress' I/O thread.
        self.assertGreater(ended["direct"], len(body) // 2)

    def test_invalid_utf8_is_replaced(self):
        sock, _ = self.follow()
        with open(self.path, "ab") as f:
            f.write(b"bad \xff\xfe bytes\n")
        data = read_until(sock, b"bytes\n")
        self.assertIn("bad \ufffd\ufffd bytes".encode(), data)


class TestServerSentEvents(LogTestCase):
    def test_event_ids_name_file_and_offset_and_last_event_id_resumes_exactly(self):
        sock, head = self.follow("log=app&format=sse&lines=2")
        self.assertIn(b"Content-Type: text/event-stream; charset=utf-8", head)
        data = (
            head if b"second old line\n" in head else head + read_until(sock, b"second old line\n")
        )
        offset = os.path.getsize(self.path)
        last_id = re.findall(rb"id: ([0-9a-f]{16}-%d)\n" % offset, data)[-1].decode()
        sock.close()
        # Written while no client follows; a reconnecting EventSource sends
        # the last id it got.
        self.write("missed one\nmissed two\n")
        sock = self.connect().request(
            "/plone/@@stream-log?log=app&format=sse",
            auth=("admin", "secret"),
            headers={"Last-Event-ID": last_id},
        )
        data = read_until(sock, b"missed two\n")
        text = data.decode()
        self.assertIn("event: stream\n", text)
        self.assertNotIn("event: switch", text)
        self.assertEqual(re.findall(r"data: (.*)\n", text)[1:3], ["missed one", "missed two"])
        self.assertNotIn("old line", text)
        self.assertRegex(text, f"id: [0-9a-f]{{16}}-{os.path.getsize(self.path)}\n")

    def test_every_event_stream_says_when_to_reconnect_and_they_differ(self):
        self.configure(max_streams_per_user=0)
        low, high = RETRY_RANGE
        retries = []
        for _ in range(12):
            sock, _head = self.follow("log=app&format=sse")
            data = sock.read_until(b"\n\n").decode()  # the first event
            retries.append(int(re.search(r"retry: (\d+)\n\n", data).group(1)))
            sock.close()
        self.assertTrue(all(low <= retry <= high for retry in retries), retries)
        # Jittered: a restart does not bring every viewer back at once.
        self.assertGreater(len(set(retries)), 1, retries)

    def test_catch_up_of_a_large_log_as_events_is_exact(self):
        text, size = TestFollowing.big_log(self)
        body, ended = TestFollowing.read_to_the_end(self, "log=app&format=sse&offset=0")
        events = body.decode().split("\n\n")
        self.assertRegex(events[0], r"^retry: \d+$")
        self.assertRegex(events[1], r"^event: stream\ndata: \{.*\}$")
        self.assertEqual(events[-2:], ["event: end\ndata: ", ""])
        received, offset = [], 0
        for event in events[2:-2]:
            head, *data = event.split("\n")
            self.assertRegex(head, r"^id: [0-9a-f]{16}-[0-9]+$")
            self.assertGreater(int(head.rpartition("-")[2]), offset)
            offset = int(head.rpartition("-")[2])
            self.assertTrue(all(line.startswith("data: ") for line in data))
            received.append("\n".join(line[6:] for line in data))
        self.assertEqual("".join(received), text.replace("\r\n", "\n"))
        self.assertEqual(offset, size)
        self.assertGreater(ended["direct"], 0)

    def test_end_marker_sends_an_end_event(self):
        sock, _ = self.follow("log=app&format=sse")
        self.write(f"{MARKER}\n")
        data = sock.body()
        self.assertIn(b"event: end\n", data)

    def test_heartbeat_comments_while_idle(self):
        self.configure(heartbeat_interval=1)
        sock, _ = self.follow("log=app&format=sse")
        read_until(sock, b": keep-alive\n\n", timeout=5)


class TestStatus(LogTestCase):
    def test_status_lists_the_live_stream(self):
        sock, _ = self.follow()
        self.write("something\n")
        read_until(sock, b"something\n")
        (live,) = self.status_json()["live"]
        self.assertEqual(live["log"], "app")
        self.assertEqual(live["user"], "admin")
        self.assertEqual(live["client"], "127.0.0.1")
        self.assertGreater(live["bytes_sent"], 0)

    def test_status_page_says_when_no_broker_is_configured(self):
        status, _, body = self.get_as_manager("/plone/@@stream-status")
        self.assertEqual(status, 200)
        self.assertIn(b'id="streamguard-no-broker"', body)
        self.assertIn(b"No broker is configured", body)
        self.assertNotIn(b'id="streamguard-workers"', body)
        self.assertIsNone(self.status_json()["workers"])

    def test_status_page_needs_a_manager(self):
        status, _, _ = self.get("/plone/@@stream-status")
        self.assertIn(status, (302, 401))


class TestSecurity(LogTestCase):
    def request(self, query, user=("admin", "secret"), path="/plone/@@stream-log"):
        return self.http(f"{path}?{query}", auth=user)

    def test_anonymous_is_sent_to_log_in(self):
        status, headers, _ = self.request("log=app", user=None)
        self.assertEqual(status, 302)
        self.assertIn("login", headers["location"])

    def test_user_without_the_permission_gets_403(self):
        status, headers, body = self.request("log=app", user=(TEST_USER_NAME, TEST_USER_PASSWORD))
        self.assertEqual(status, 403)
        self.assertEqual(body, b"You may not view log streams.\n")
        status, _, _ = self.request(
            "", user=(TEST_USER_NAME, TEST_USER_PASSWORD), path="/plone/@@stream-log-viewer"
        )
        self.assertEqual(status, 403)

    def test_the_permission_can_be_granted_to_another_role(self):
        portal = self.layer["portal"]
        portal.manage_permission(VIEW_LOG_STREAMS, roles=["Manager", "Member"], acquire=False)
        transaction.commit()
        sock = self.connect().request(
            "/plone/@@stream-log?log=app&lines=1", auth=(TEST_USER_NAME, TEST_USER_PASSWORD)
        )
        data = read_until(sock, b"second old line\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "))

    def test_unknown_log_is_404(self):
        status, headers, body = self.request("log=nosuchlog")
        self.assertEqual(status, 404)
        self.assertTrue(body.startswith(b"Unknown log. The logs here are: app"))
        self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")

    def test_traversal_attempts_read_nothing(self):
        secret = os.path.join(self.directory, "secret.txt")
        self.write("TOP SECRET\n", path=secret, mode="w")
        attempts = [
            "log=../secret.txt",
            "log=..%2Fsecret.txt",
            "log=%2E%2E%2Fsecret.txt",
            "log=%252e%252e%252fsecret.txt",
            f"log={secret}",
            "log=app%00",
            "log=app/../secret.txt",
            "log=app&offset=../1",
            "log=app&lines=-1",
            "log=app&offset=%00",
            "log=app&lines=1e3",
        ]
        for query in attempts:
            status, _, body = self.request(query)
            self.assertIn(status, (400, 404), query)
            self.assertNotIn(b"SECRET", body, query)

    def test_file_swapped_for_a_symlink_reads_nothing(self):
        secret = os.path.join(self.directory, "outside.txt")
        self.write("TOP SECRET\n", path=secret, mode="w")
        os.unlink(self.path)
        os.symlink(secret, self.path)
        status, _, body = self.request("log=app&offset=0")
        self.assertEqual(status, 404)
        self.assertNotIn(b"SECRET", body)

    def swap_while_following(self, swap, query="log=app"):
        """Follow, then ``swap(secret)`` the log for another file; return the
        whole body the stream sent and how it ended."""
        recorder = Recorder.attach(self)
        secret = os.path.join(self.directory, "outside.txt")
        self.write("TOP SECRET\n", path=secret, mode="w")
        sock, _ = self.follow(query)
        self.write("legit\n")
        read_until(sock, b"legit\n")
        swap(secret)
        self.write("MORE SECRET\n", path=secret)
        body = sock.body()  # the stream ends by itself
        self.assertTrue(wait_for(lambda: recorder.ended))
        self.assertNotIn(b"SECRET", body)
        return body, recorder.ended[0]["reason"]

    def test_symlink_swap_while_following_ends_the_stream_unsent(self):
        def swap(secret):
            os.unlink(self.path)
            os.symlink(secret, self.path)

        _, reason = self.swap_while_following(swap)
        self.assertEqual(reason, "log unavailable")
        status, _, body = self.request("log=app")
        self.assertEqual(status, 404)
        self.assertIn(b"The log app is configured but cannot be streamed", body)
        self.assertIn(b"symbolic link", body)
        self.assertGreaterEqual(self.status_json()["ended"]["log unavailable"], 1)

    def test_hard_link_moved_in_place_ends_the_stream_unsent(self):
        def swap(secret):
            linked = os.path.join(self.directory, "linked.tmp")
            os.link(secret, linked)
            os.rename(linked, self.path)  # looks like a rotation

        body, reason = self.swap_while_following(swap)
        self.assertEqual(reason, "log unavailable")
        self.assertIn(b"legit\n", body)
        status, _, body = self.request("log=app&offset=0")
        self.assertEqual(status, 404)
        self.assertIn(b"2 hard links", body)

    def test_sse_client_is_told_the_log_is_unavailable(self):
        def swap(secret):
            os.unlink(self.path)
            os.symlink(secret, self.path)

        body, reason = self.swap_while_following(swap, "log=app&format=sse")
        self.assertEqual(reason, "log unavailable")
        self.assertIn(b"event: error\ndata: The log cannot be read any more.\n\n", body)

    def test_numbers_are_whole_numbers_only(self):
        for query in ("log=app&lines=5%0A", "log=app&offset=5%0A", "log=app&lines=%205"):
            status, _, body = self.request(query)
            self.assertEqual(status, 400, query)
            self.assertIn(b"must be a whole number", body)
        status, _, body = self.request("log=app&lines=100001")
        self.assertEqual(status, 400)
        self.assertEqual(body, b"lines must be at most 100000.\n")

    def test_head_is_answered_without_a_stream(self):
        before = live_streams.snapshot()
        status, headers, _ = self.http(
            "/plone/@@stream-log?log=app", method="HEAD", auth=("admin", "secret")
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")
        self.assertEqual(live_streams.snapshot(), before)

    def test_status_names_the_instance_which_a_setting_may_name(self):
        status, _, body = self.get_as_manager("/plone/@@stream-status")
        self.assertEqual(status, 200)
        self.assertIn(f"{socket.gethostname()}:{self.layer['port']}".encode(), body)
        self.assertIn(b"process's only", body)
        set_product_config(self, **{"instance-name": "backend-2"})
        status, _, body = self.get_as_manager("/plone/@@stream-status?format=json")
        self.assertEqual(json.loads(body)["instance"], "backend-2")

    def test_status_json_is_json_and_not_sniffed(self):
        status, headers, body = self.get_as_manager("/plone/@@stream-status?format=json")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json; charset=utf-8")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertIn("ended", json.loads(body))

    def test_log_content_is_never_html_in_the_stream(self):
        sock, head = self.follow()
        self.assertIn(b"X-Content-Type-Options: nosniff", head)
        self.assertIn(b"text/plain", head)

    def test_viewer_page_renders_for_managers(self):
        status, _, body = self.request("", path="/plone/@@stream-log-viewer")
        self.assertEqual(status, 200)
        self.assertIn(b'id="streamguard-viewer"', body)
        self.assertIn(b'<option value="app"', body)
