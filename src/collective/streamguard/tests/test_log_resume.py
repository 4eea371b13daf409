"""Resuming ``@@stream-log`` with ``Last-Event-ID``: exact on the same file,
honest everywhere else.  A real Plone site on a real waitress, raw sockets.

Another instance's file is simulated honestly: the configured name ``app``
is pointed at another real file between two requests (what a site manager
can do in the control panel, and what a cluster is, where one name is a
different file on each instance).  The round robin through a balancer is
the cluster tests' (``EventStream`` in ``tests/sse.py`` is for them too).
"""

import os
import shutil
import socket

from plone.app.testing import SITE_OWNER_NAME
from plone.app.testing import SITE_OWNER_PASSWORD

from collective.streamguard.logs.position import Switch
from collective.streamguard.testing import set_product_config
from collective.streamguard.tests.sse import EventStream
from collective.streamguard.tests.streamcases import LogTestCase


class ResumeTestCase(LogTestCase):
    def setUp(self):
        super().setUp()
        # Many short streams one after another: the per-user limit would
        # count one that has not finished ending yet.
        self.configure(max_streams_per_user=0)

    def events(self, query="", last_event_id=None, headers=None):
        """An ``EventStream`` of the log ``app``; its start event read."""
        stream = EventStream.open(
            (self.layer["host"], self.layer["port"]),
            f"/plone/@@stream-log?log=app&format=sse&{query}",
            auth=(SITE_OWNER_NAME, SITE_OWNER_PASSWORD),
            last_event_id=last_event_id,
            headers=headers,
        )
        self.sockets.append(stream.client)
        self.assertEqual(stream.status, 200)
        stream.start = stream.next()
        self.assertIn(stream.start.type, ("stream", "switch"), stream.start)
        return stream

    def read_to_the_end(self, stream, path=None):
        """The data of the message events until the stream's offset is the
        file's size now."""
        size = os.path.getsize(path or self.path)
        received = []
        while stream.offset != size:
            event = stream.next()
            self.assertIsNotNone(event, "the stream ended")
            if event.type == "message":
                received.append(event.data)
        return "".join(received)

    def last_id(self, query="lines=2"):
        """The last event id of a client that read the whole log, then left."""
        stream = self.events(query)
        self.read_to_the_end(stream)
        stream.close()
        return stream.last_event_id

    def assert_switched(self, stream, reason, lines):
        self.assertEqual(stream.start.type, "switch")
        about = stream.start.json()
        self.assertEqual(about["reason"], reason)
        self.assertEqual(about["log"], "app")
        self.assertEqual(about["lines"], lines)
        self.assertEqual(about["instance"], f"{socket.gethostname()}:{self.layer['port']}")


class TestExactResume(ResumeTestCase):
    def test_many_reconnects_get_every_line_exactly_once(self):
        stream = self.events("lines=2")
        received = []
        for round in range(30):
            self.write(f"round {round} line\n")
            if round % 4 == 0:
                # Half a line: the rest comes later, maybe on another connection.
                self.write(f"round {round} half, ")
            if round % 4 == 1:
                self.write("the other half\n")
            how = round % 3
            if how == 0:  # caught up, then gone
                received.append(self.read_to_the_end(stream))
            elif how == 1:  # gone after one event, whatever else was on the way
                event = stream.next()
                if event.type == "message":
                    received.append(event.data)
            stream.close()  # how == 2: gone before reading anything
            self.write(f"written while away {round}\n")
            stream = self.events("lines=2", last_event_id=stream.last_event_id)
            self.assertEqual(stream.start.type, "stream", stream.start)
        received.append(self.read_to_the_end(stream))
        with open(self.path, encoding="utf-8") as f:
            self.assertEqual("".join(received), f.read())

    def test_a_reconnect_before_any_data_resumes_at_the_start(self):
        # Started at the end: no data, but the start event has the place.
        stream = self.events()
        self.assertEqual(stream.offset, os.path.getsize(self.path))
        stream.close()
        self.write("written before the reconnect\n")
        stream = self.events(last_event_id=stream.last_event_id)
        self.assertEqual(stream.start.type, "stream")
        self.assertEqual(self.read_to_the_end(stream), "written before the reconnect\n")

    def test_resume_in_the_query_is_last_event_id(self):
        last = self.last_id()
        self.write("missed\n")
        stream = self.events(f"lines=2&resume={last}")
        self.assertEqual(stream.start.type, "stream")
        self.assertEqual(self.read_to_the_end(stream), "missed\n")

    def test_a_plain_offset_of_earlier_versions_resumes_at_a_line_start(self):
        # "first old line\n" is 15 bytes: an id the deployed version sent.
        stream = self.events("lines=2", last_event_id="15")
        self.assertEqual(stream.start.type, "stream")
        self.assertEqual(self.read_to_the_end(stream), "second old line\n")

    def test_the_start_event_names_the_configured_instance(self):
        set_product_config(self, **{"instance-name": "backend-2"})
        stream = self.events("lines=0")
        self.assertEqual(stream.start.json(), {"instance": "backend-2", "log": "app"})


class TestSwitch(ResumeTestCase):
    def test_another_file_under_the_same_name_is_a_switch(self):
        last = self.last_id()
        # Same name, same bytes, another inode: another instance's file.
        other = os.path.join(self.directory, "other.log")
        shutil.copy(self.path, other)
        self.configure(log_files=[f"app|{other}"])
        stream = self.events("lines=1", last_event_id=last)
        self.assert_switched(stream, Switch.OTHER_FILE, 1)
        self.assertEqual(self.read_to_the_end(stream, other), "second old line\n")
        # The new stream's ids are the other file's: a reconnect resumes there.
        with open(other, "a") as f:
            f.write("more in the other file\n")
        stream.close()
        stream = self.events("lines=1", last_event_id=stream.last_event_id)
        self.assertEqual(stream.start.type, "stream")
        self.assertEqual(self.read_to_the_end(stream, other), "more in the other file\n")

    def test_back_and_forth_between_two_files_every_line_once(self):
        # As a round robin between two instances: the name is one file,
        # then the other; the id carries the place in the file left.
        paths = [self.path, os.path.join(self.directory, "other.log")]
        with open(paths[1], "w") as f:
            f.write("other first\nother second\n")
        received = {path: [] for path in paths}
        stream = self.events("lines=2")
        for round in range(12):
            here = paths[round % 2]
            if round:
                self.assertEqual(stream.start.type, "switch", stream.start)
                about = stream.start.json()
                if round == 1:  # the first time on the other file
                    self.assertEqual(
                        (about["reason"], about["start"]), (Switch.OTHER_FILE, "lines")
                    )
                else:
                    self.assertEqual(
                        (about["reason"], about["start"]), (Switch.RETURNED, "resumed")
                    )
            for path in paths:
                with open(path, "a") as f:
                    f.write(f"round {round} in {os.path.basename(path)}\n")
            received[here].append(self.read_to_the_end(stream, here))
            stream.close()
            self.configure(log_files=[f"app|{paths[(round + 1) % 2]}"])
            stream = self.events("lines=2", last_event_id=stream.last_event_id)
        received[paths[0]].append(self.read_to_the_end(stream, paths[0]))
        with open(paths[0], encoding="utf-8") as f:
            self.assertEqual("".join(received[paths[0]]), f.read())
        with open(paths[1], encoding="utf-8") as f:
            # From the last 2 lines when it was first switched to.
            self.assertEqual("other first\n" + "".join(received[paths[1]]), f.read())

    def test_a_file_rotated_by_rename_is_a_switch(self):
        last = self.last_id()
        os.rename(self.path, self.path + ".1")
        self.write("a new first line\na new second line\na new third line\n", mode="w")
        stream = self.events("lines=1", last_event_id=last)
        self.assert_switched(stream, Switch.OTHER_FILE, 1)
        self.assertEqual(self.read_to_the_end(stream), "a new third line\n")

    def test_a_file_rotated_by_copytruncate_is_a_switch(self):
        last = self.last_id()
        inode = os.stat(self.path).st_ino
        shutil.copy(self.path, self.path + ".1")
        os.truncate(self.path, 0)
        self.write("after truncation one\nafter truncation two\nafter truncation three\n")
        self.assertEqual(os.stat(self.path).st_ino, inode)
        stream = self.events("lines=2", last_event_id=last)
        self.assert_switched(stream, Switch.OTHER_FILE, 2)
        self.assertEqual(
            self.read_to_the_end(stream), "after truncation two\nafter truncation three\n"
        )

    def test_copytruncate_to_the_same_first_bytes_is_a_switch(self):
        # A log that starts with the same banner every time: the first
        # bytes are the same, the bytes before the offset are not.
        banner = "=" * 80 + " application log\n"
        self.write(banner + "old line\n", mode="w")
        last = self.last_id("lines=2")
        os.truncate(self.path, 0)
        self.write(banner + "a new and longer line\n")
        stream = self.events("lines=1", last_event_id=last)
        self.assert_switched(stream, Switch.OTHER_FILE, 1)
        self.assertEqual(self.read_to_the_end(stream), "a new and longer line\n")

    def test_a_switch_without_lines_starts_at_the_end(self):
        other = os.path.join(self.directory, "other.log")
        shutil.copy(self.path, other)
        last = self.last_id()
        self.configure(log_files=[f"app|{other}"])
        stream = self.events(last_event_id=last)
        self.assert_switched(stream, Switch.OTHER_FILE, None)
        # At the end: the start event has the place, and no data came.
        self.assertEqual(stream.offset, os.path.getsize(other))
        with open(other, "a") as f:
            f.write("after the switch\n")
        self.assertEqual(self.read_to_the_end(stream, other), "after the switch\n")

    def test_a_plain_offset_that_is_no_line_start_is_a_switch(self):
        for offset in ("5", "31000"):  # within a line; past the end
            with self.subTest(offset=offset):
                stream = self.events("lines=1", last_event_id=offset)
                self.assert_switched(stream, Switch.NOT_A_LINE_START, 1)
                self.assertEqual(self.read_to_the_end(stream), "second old line\n")
                stream.close()

    def test_ids_that_are_none_of_ours_are_a_clean_switch(self):
        garbage = [
            "abc",
            "-5",
            "12-34",
            "0123456789abcdeg-5",
            "0123456789ABCDEF-5",
            "9" * 16,
            "x" * 4000,
            "15 16",
            "\u00e9\u00e8",
        ]
        for last in garbage:
            with self.subTest(last=last[:20]):
                stream = self.events("lines=1", last_event_id=last)
                self.assert_switched(stream, Switch.UNKNOWN_ID, 1)
                self.assertEqual(self.read_to_the_end(stream), "second old line\n")
                stream.close()
        # Well formed, but no file here has it.
        stream = self.events("lines=1", last_event_id="0123456789abcdef-20")
        self.assert_switched(stream, Switch.OTHER_FILE, 1)

    def test_a_text_stream_with_a_bad_id_starts_where_lines_says(self):
        sock = self.connect().request(
            "/plone/@@stream-log?log=app&lines=1",
            auth=(SITE_OWNER_NAME, SITE_OWNER_PASSWORD),
            headers={"Last-Event-ID": "no id of ours"},
        )
        self.assertEqual(sock.head()[0], 200)
        self.assertNotIn(b"first old line", sock.read_until(b"second old line\n"))
