"""LogFollower on real files: appends, rotation, truncation, deletion,
symbolic links and FIFOs made by the test itself, in a temporary directory."""

import gc
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest
from unittest import mock

from collective.streamguard.logs import follower as follow
from collective.streamguard.logs import inotify
from collective.streamguard.logs import utf8
from collective.streamguard.logs.follower import LogFollower
from collective.streamguard.logs.follower import LogUnavailable
from collective.streamguard.logs.follower import Piece
from collective.streamguard.logs.source import LogSource
from collective.streamguard.tests.helpers import wait_for

MARKER = follow.END_MARKER
SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(follow.__file__))))


def readable_within(fd, timeout):
    """Seconds until ``fd`` became readable, or None."""
    start = time.monotonic()
    ready, _, _ = select.select([fd], [], [], timeout)
    return time.monotonic() - start if ready else None


def read_all(follower):
    pieces = []
    while batch := follower.read():
        pieces.extend(batch)
    return pieces


def text_of(pieces):
    return "".join(piece.text for piece in pieces)


class FollowTestCase(unittest.TestCase):
    def setUp(self):
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        self.dir = directory.name
        self.path = os.path.join(self.dir, "event.log")

    def append(self, data, path=None):
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(path or self.path, "ab") as file:
            file.write(data)

    def follower(self, path=None, **options):
        follower = LogFollower(path or self.path, **options)
        self.addCleanup(follower.close)
        follower.open()
        return follower


class StartTests(FollowTestCase):
    def test_starts_at_the_end_by_default(self):
        self.append("old\n")
        follower = self.follower()
        self.assertEqual(follower.read(), [])
        self.append("new\n")
        self.assertEqual(follower.read(), [Piece("new\n", 8)])

    def test_offset_starts_there(self):
        self.append("one\ntwo\n")
        self.assertEqual(text_of(self.follower(offset=4).read()), "two\n")

    def test_offset_beyond_the_size_starts_at_zero(self):
        self.append("rotated\n")
        self.assertEqual(text_of(self.follower(offset=500).read()), "rotated\n")

    def test_last_lines_are_the_last_complete_lines_and_what_follows(self):
        self.append("a\nb\nc\nd")
        self.assertEqual(text_of(self.follower(last_lines=2).read()), "b\nc\nd")
        self.assertEqual(text_of(self.follower(last_lines=9).read()), "a\nb\nc\nd")
        # 0: the line being written, from its start; nothing after a newline.
        self.assertEqual(text_of(self.follower(last_lines=0).read()), "d")
        self.append("\n")
        self.assertEqual(self.follower(last_lines=0).read(), [])

    def test_last_lines_across_blocks(self):
        lines = [f"{n:06d} " + "x" * 993 + "\n" for n in range(300)]
        self.append("".join(lines))
        follower = self.follower(last_lines=70)
        self.assertEqual(text_of(read_all(follower)), "".join(lines[-70:]))

    def test_offset_and_last_lines_together_are_refused(self):
        with self.assertRaises(ValueError):
            LogFollower(self.path, offset=0, last_lines=1)

    def test_size_and_offset(self):
        self.append("12345\n")
        follower = self.follower(offset=0)
        self.assertEqual((follower.size, follower.offset), (6, 0))
        follower.read()
        self.assertEqual(follower.offset, 6)


class AppendTests(FollowTestCase):
    def test_inotify_fd_becomes_readable_within_milliseconds_of_an_append(self):
        self.append("start\n")
        follower = self.follower()
        self.assertGreaterEqual(follower.fileno(), 0)
        self.assertIsNone(readable_within(follower.fileno(), 0.05))
        for n in range(5):
            self.append(f"line {n}\n")
            self.assertLess(readable_within(follower.fileno(), 1.0), 0.05)
            self.assertEqual(text_of(follower.read()), f"line {n}\n")
            # read() drained the fd.  A later event of the same append (the
            # process' shared inotify instance is read by the hub's thread)
            # may make it readable once more: then there is nothing new.
            for _ in range(3):
                if readable_within(follower.fileno(), 0.05) is None:
                    break
                self.assertEqual(follower.read(), [])

    def test_writes_to_other_files_in_the_directory_do_not_wake_it(self):
        self.append("x\n")
        self.append("x\n", os.path.join(self.dir, "access.log"))
        follower = self.follower()
        self.append("request\n", os.path.join(self.dir, "access.log"))
        self.assertIsNone(readable_within(follower.fileno(), 0.05))

    def test_partial_lines_are_returned_as_they_arrive(self):
        follower = self.follower()
        self.append("abc")
        self.assertEqual(follower.read(), [Piece("abc", 3)])
        self.append("def\n")
        self.assertEqual(follower.read(), [Piece("def\n", 7)])

    def test_read_returns_about_max_bytes(self):
        self.append("y" * 100_000)
        follower = self.follower(offset=0)
        self.assertEqual(len(text_of(follower.read(max_bytes=30_000))), 30_000)
        self.assertEqual(len(text_of(follower.read())), 70_000)

    def test_a_50_mb_line_comes_in_bounded_pieces_in_bounded_memory(self):
        block = b"x" * (1 << 20)
        with open(self.path, "wb") as file:
            for _ in range(50):
                file.write(block)
        del block
        follower = self.follower(offset=0, max_piece=65536)
        total = 0
        tracemalloc.start()
        try:
            while pieces := follower.read():
                for piece in pieces:
                    self.assertLessEqual(len(piece.text), 65536)
                    total += len(piece.text)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertEqual((total, follower.offset), (50 << 20, 50 << 20))
        # Bounded by read()'s max_bytes (1 MiB), not the line: two batches
        # alive at once (the test's and the one being read), as bytes and text.
        self.assertLess(peak, 6 << 20)


class SharedStateTests(FollowTestCase):
    """What ``logs.stream.FanOut`` relies on: followers that took the same
    answer of their source say so (``shared_state``), and ``adopt`` moves
    a follower exactly as its own read would."""

    def write_once(self, follower, data):
        """Append ``data`` through a writer kept open (one IN_MODIFY, no
        IN_CLOSE_WRITE) and wait until the source has counted it: no event
        comes after, so answers are shared."""
        writer = open(self.path, "ab", buffering=0)
        self.addCleanup(writer.close)
        before = follower.source.changes
        writer.write(data)
        self.assertTrue(wait_for(lambda: follower.source.changes == before + 1))
        return follower.source.changes

    def test_followers_that_read_the_same_answer_share_their_state(self):
        self.append("old\n")
        first, second = self.follower(), self.follower()
        self.assertTrue(first.notifies)
        self.write_once(first, b"new line\n")
        pieces = first.read(notified=True)
        self.assertEqual([piece.text for piece in pieces], ["new line\n"])
        self.assertIsNotNone(first.shared_state)
        self.assertEqual(second.read(notified=True), pieces)
        self.assertIs(second.shared_state, first.shared_state)
        # A read of one's own (not notified) is not shared.
        second.read()
        self.assertIsNone(second.shared_state)

    def test_adopt_moves_a_follower_as_its_own_read_would(self):
        self.append("old\n")
        leader, adopter, reader = self.follower(), self.follower(), self.follower()
        changes = self.write_once(leader, b"shared line\n")
        self.assertEqual([p.text for p in leader.read(notified=True)], ["shared line\n"])
        adopter.adopt(leader.shared_state, changes)
        self.assertEqual([p.text for p in reader.read()], ["shared line\n"])
        for name in ("offset", "event_id", "ended"):
            self.assertEqual(getattr(adopter, name), getattr(reader, name), name)
        self.assertTrue(adopter.at_end)
        self.assertEqual(adopter.read(notified=True), [])
        self.append("next\n")
        self.assertEqual([p.text for p in adopter.read()], ["next\n"])

    def test_a_file_written_while_no_follower_had_it_open_is_read_afresh(self):
        # A copytruncate while the file's only follower leaves: the
        # truncation is counted and answered (size 0), the follower closes
        # the file (its watch goes), and the writer writes the rest
        # unwatched.  The source lives on (another follower of the name
        # holds it).  A follower opening the file again must not be
        # answered from before that write: no change would ever come to
        # correct it (test_log_resume's copytruncate tests hung so, about
        # once in 300 runs).
        self.append("old line one\nold line two\n")
        leaving = self.follower(offset=0)
        holder = LogSource.acquire(leaving.path)
        self.addCleanup(holder.release)
        self.assertIs(holder, leaving.source)
        self.assertEqual(text_of(read_all(leaving)), "old line one\nold line two\n")
        before = leaving.source.changes
        os.truncate(self.path, 0)
        self.assertTrue(wait_for(lambda: leaving.source.changes != before))
        self.assertEqual(leaving.read(notified=True), [])  # "size 0" is kept now
        leaving.close()
        self.append("new line\n")
        joining = self.follower(last_lines=1)
        self.assertEqual(text_of(joining.read(notified=True)), "new line\n")
        # And its writes are reported again.
        changes = joining.source.changes
        self.append("next line\n")
        self.assertTrue(wait_for(lambda: joining.source.changes != changes))
        self.assertEqual(text_of(joining.read(notified=True)), "next line\n")

    def hold_the_hub(self):
        """Keep the hub's thread (which counts inotify's events) busy until
        the returned function is called: changes wait, uncounted."""
        from collective.streamguard import hub

        held, release = threading.Event(), threading.Event()

        def hold():
            held.set()
            release.wait(30)

        hub.hub().call_soon(hold)
        self.assertTrue(held.wait(10))
        self.addCleanup(release.set)
        return release.set

    def test_an_answer_older_than_the_start_is_no_truncation(self):
        # A stream resumes at a place its last connection read (a look of
        # its own, at open) after a write whose change the hub has not
        # counted yet: the size its source kept is older, and smaller.
        # It must not take that for a truncation and send the log again.
        self.append("old line\n")
        first = self.follower(offset=0)
        self.assertEqual(text_of(first.read(notified=True)), "old line\n")  # size 9 kept
        release = self.hold_the_hub()
        self.append("written meanwhile\n")
        resumed = self.follower(offset=27)
        self.assertEqual(resumed.read(notified=True), [])
        self.assertEqual(resumed.offset, 27)
        self.append("after\n")
        changes = resumed.source.changes
        release()
        self.assertTrue(wait_for(lambda: resumed.source.changes != changes))
        self.assertEqual(resumed.read(notified=True), [Piece("after\n", 33)])

    def test_a_truncation_newer_than_the_kept_answers_reads_the_new_bytes(self):
        # The same stream, and the file is truncated and written again
        # before the hub counts anything: the truncation is real (its own
        # look says so), and the bytes kept at offset 0 are the old file's.
        self.append("old line one\nold line two\n")
        first = self.follower(offset=0)
        self.assertEqual(text_of(first.read(notified=True)), "old line one\nold line two\n")
        release = self.hold_the_hub()
        self.append("more\n")
        resumed = self.follower(offset=31)
        os.truncate(self.path, 0)
        self.append("fresh\n")
        self.assertEqual(resumed.read(notified=True), [Piece("fresh\n", 6)])
        release()

    def test_followers_share_again_after_a_truncation(self):
        # A copytruncate, counted: the first follower to see it makes the
        # source forget what it kept; the others share the second one's
        # answer, as in any fan-out.
        self.append("old line one\nold line two\n")
        followers = [self.follower(offset=0) for _ in range(3)]
        for follower in followers:
            self.assertEqual(text_of(follower.read(notified=True)), "old line one\nold line two\n")
        changes = followers[0].source.changes
        # One change: both writes wait for the hub, then come as one event
        # (the writer stays open: no IN_CLOSE_WRITE after it).
        release = self.hold_the_hub()
        with open(self.path, "r+b", buffering=0) as writer:
            writer.truncate(0)
            writer.write(b"fresh\n")
            release()
            self.assertTrue(wait_for(lambda: followers[0].source.changes != changes))
            first, second, third = (follower.read(notified=True) for follower in followers)
            self.assertEqual(followers[0].source.changes, changes + 1)
        self.assertEqual([first, second, third], [[Piece("fresh\n", 6)]] * 3)
        self.assertIsNone(followers[0].shared_state)  # read before the forgetting
        self.assertIsNotNone(followers[1].shared_state)
        self.assertIs(followers[2].shared_state, followers[1].shared_state)

    def test_an_answer_older_than_the_start_is_no_rotation(self):
        # The same with a rotation whose directory event is not counted
        # yet: the name's kept answer was the old file when the follower
        # opened the new one (which forgets the kept answers).  It reads
        # the new one, never the old one again from 0.
        self.append("old file\n")
        first = self.follower(offset=0)
        self.assertEqual(text_of(first.read(notified=True)), "old file\n")
        release = self.hold_the_hub()
        os.rename(self.path, self.path + ".1")
        self.append("new file\n")
        joined = self.follower(offset=9)
        self.assertEqual(joined.read(notified=True), [])
        self.assertEqual(joined.offset, 9)
        release()
        self.append("more\n")
        self.assertEqual(text_of(read_all(joined)), "more\n")

    def test_a_follower_keeps_its_attributes_in_its_class_shared_keys(self):
        # CPython 3.11 shares an instance's attribute names with its class
        # up to 29 of them; one more gives each follower (one per viewer) a
        # dict of its own: 1.3 KiB more per stream, measured.
        follower = self.follower(last_lines=2)
        follower.on_change(lambda: None)
        follower.fileno()
        follower.read(notified=True)
        self.assertLessEqual(len(vars(follower)), 29, sorted(vars(follower)))


#: The names opened while a test records (``sys.audit``'s "open" events;
#: an audit hook stays for the process, so it records only when asked).
_opened = None


def _record_opens(event, args):
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)


class JoiningTests(FollowTestCase):
    """A follower that joins a file its source has open shares it as it is:
    no open() of its own (a thousand viewers arriving at once were a
    thousand open(), fstat() and close() calls, each handing the GIL over).
    What it checks of the name still holds."""

    def opens_during(self, function):
        global _opened
        _opened = []
        try:
            function()
        finally:
            opened, _opened = _opened, None
        return [name for name in opened if os.path.basename(name) == "event.log"]

    def test_a_follower_that_joins_an_open_file_shares_it_without_opening_it(self):
        self.append("one\n")
        self.assertEqual(len(self.opens_during(lambda: self.follower(offset=0))), 1)
        second = LogFollower(self.path, offset=0)
        self.addCleanup(second.close)
        self.assertEqual(self.opens_during(second.open), [])
        self.assertEqual(len(second.source.files), 1)
        [shared] = second.source.files.values()
        self.assertEqual(shared.users, 2)
        self.assertEqual(text_of(second.read()), "one\n")

    def test_a_follower_dropped_without_close_gives_its_file_back(self):
        # What a stream body the publisher never ran leaves behind.
        self.append("one\n")
        keeper = self.follower()
        dropped = LogFollower(self.path)
        dropped.open()
        source = dropped.source
        [shared] = source.files.values()
        self.assertEqual((source.users, shared.users), (2, 2))
        del dropped
        gc.collect()
        self.assertEqual((source.users, shared.users), (1, 1))
        keeper.close()
        self.assertEqual(source.files, {})

    def test_followers_of_an_empty_log_read_it_and_a_pseudo_file_is_still_refused(self):
        first = self.follower()
        second = self.follower()
        self.append("later\n")
        self.assertEqual(text_of(first.read()), "later\n")
        self.assertEqual(text_of(second.read()), "later\n")
        with self.assertRaisesRegex(LogUnavailable, "pseudo-file"):
            self.follower(path="/proc/self/status")

    def test_a_follower_that_joins_after_the_name_became_a_symlink_is_refused(self):
        self.append("one\n")
        self.follower()  # keeps the file open
        os.rename(self.path, self.path + ".1")
        os.symlink(self.path + ".1", self.path)
        with self.assertRaisesRegex(LogUnavailable, "symbolic link"):
            self.follower()

    def test_a_follower_that_joins_after_a_second_link_was_made_is_refused(self):
        self.append("one\n")
        self.follower()
        os.link(self.path, self.path + ".other")
        with self.assertRaisesRegex(LogUnavailable, "hard links"):
            self.follower()


class MarkerTests(FollowTestCase):
    def test_marker_line_ends_the_log_and_nothing_after_it_is_returned(self):
        follower = self.follower()
        self.append(f"done\n{MARKER} at 12:00\nafter\n")
        self.assertEqual(follower.read(), [Piece("done\n", 5)])
        self.assertTrue(follower.ended)
        self.append("later\n")
        self.assertEqual(follower.read(), [])
        self.assertTrue(follower.ended)

    def test_marker_that_does_not_start_a_line_is_text(self):
        follower = self.follower()
        self.append(f"say {MARKER}\n")
        self.assertEqual(text_of(follower.read()), f"say {MARKER}\n")
        self.assertFalse(follower.ended)

    def test_marker_prefix_is_held_back_until_decided(self):
        follower = self.follower()
        self.append("line\n<<<<<EOF")
        self.assertEqual(follower.read(), [Piece("line\n", 5)])
        self.append("X\n")  # not the marker after all
        self.assertEqual(text_of(follower.read()), "<<<<<EOFX\n")
        self.append("<<")
        self.assertEqual(follower.read(), [])
        self.append(MARKER[2:])  # no newline needed: the line starts with it
        self.assertEqual(follower.read(), [])
        self.assertTrue(follower.ended)

    def test_marker_split_across_pieces(self):
        self.append("a" * 30 + "\n" + MARKER + "\nafter\n")
        follower = self.follower(offset=0, max_piece=25)
        self.assertEqual(text_of(read_all(follower)), "a" * 30 + "\n")
        self.assertTrue(follower.ended)

    def test_marker_at_the_start_of_the_file(self):
        self.append(MARKER + "\n")
        follower = self.follower(offset=0)
        self.assertEqual(follower.read(), [])
        self.assertTrue(follower.ended)

    def test_start_in_the_middle_of_a_marker_line_is_not_a_line_start(self):
        self.append(f"xx{MARKER}\n")
        self.assertEqual(text_of(self.follower(offset=2).read()), f"{MARKER}\n")

    def test_no_marker(self):
        for marker in (None, ""):
            follower = self.follower(end_marker=marker)
            self.append(f"{MARKER}\n")
            self.assertEqual(text_of(follower.read()), f"{MARKER}\n")
            self.assertFalse(follower.ended)

    def test_custom_marker(self):
        follower = self.follower(end_marker="DONE")
        self.append("DON")
        self.assertEqual(follower.read(), [])
        self.append("T\nDONE.\n")
        self.assertEqual(text_of(follower.read()), "DONT\n")
        self.assertTrue(follower.ended)

    def test_marker_after_many_lines_starting_with_its_first_byte(self):
        # More than a few lines starting with "<": the search switches from
        # the marker's first byte to the whole "\n" + marker.
        lines = "".join(f"<{n} not the end\n" for n in range(50))
        self.append(lines + f"<<<<<EOF {MARKER}\n" + MARKER + "\nafter\n")
        follower = self.follower(offset=0)
        self.assertEqual(text_of(read_all(follower)), lines + f"<<<<<EOF {MARKER}\n")
        self.assertTrue(follower.ended)

    def test_marker_deep_in_a_large_piece(self):
        head = "x" * 100 + "\n"
        self.append(head * 20_000 + MARKER + "\n")
        follower = self.follower(offset=0, max_piece=1 << 20)
        self.assertEqual(text_of(read_all(follower)), head * 20_000)
        self.assertTrue(follower.ended)


class DecodingTests(FollowTestCase):
    def test_incomplete_utf8_is_held_back_and_offsets_are_bytes(self):
        follower = self.follower()
        self.append(b"caf\xc3")
        self.assertEqual(follower.read(), [Piece("caf", 3)])
        self.assertEqual(follower.read(), [])
        self.append(b"\xa9\n")
        self.assertEqual(follower.read(), [Piece("é\n", 6)])

    def test_invalid_bytes_become_replacement_characters(self):
        follower = self.follower()
        self.append(b"a\xffb\xe2\x28\n")
        [piece] = follower.read()
        self.assertEqual(piece, Piece("a\ufffdb\ufffd(\n", 6))
        self.assertEqual(piece.data, "a\ufffdb\ufffd(\n".encode())

    def test_data_is_the_files_own_bytes_where_they_are_valid(self):
        follower = self.follower()
        self.append("größe €\n")
        [piece] = follower.read()
        self.assertEqual(piece.data, "größe €\n".encode())
        self.assertEqual(Piece("x\n", 2).data, b"x\n")

    def test_large_pieces_are_checked_across_slices(self):
        # 1 MiB pieces are checked in 64 KiB slices: a sequence cut by a
        # slice's end, invalid bytes deep in the piece, and a cut at the end.
        euro = "€".encode()
        body = b"a" * (65536 - 1) + euro + b"b" * 100_000 + b"\xff" + b"c\n"
        tail = euro[:2]
        self.append(body + tail)
        follower = self.follower(offset=0, max_piece=1 << 20)
        [piece] = follower.read()
        self.assertEqual(piece.offset, len(body))  # the cut "€" waits
        self.assertEqual(piece.text, body.decode("utf-8", "replace"))
        self.assertEqual(piece.data, body.decode("utf-8", "replace").encode())
        self.append(euro[2:] + b"\n")
        self.assertEqual(follower.read(), [Piece("€\n", len(body) + 4)])

    def test_valid_large_pieces_are_the_files_bytes_and_text_on_demand(self):
        body = ("größe € 😀 " * 20_000 + "\n").encode()
        self.append(body)
        follower = self.follower(offset=0, max_piece=1 << 20)
        [piece] = follower.read()
        # Checked slice by slice, across cut sequences, and not decoded.
        self.assertIsNone(piece._text)
        self.assertEqual(piece.data, body)
        self.assertEqual(piece.text, body.decode())
        self.assertEqual(piece, Piece(body.decode(), len(body)))

    def test_resume_from_any_piece_offset_gives_exactly_the_rest(self):
        rng = random.Random(2583)
        parts = [
            b"plain line\n",
            "größe € 😀\n".encode(),
            b"bad \xff\xfe bytes\n",
            b"<<<<<EOF not quite\n",
            b"<<<",
            b"partial ",
            b"\xf0\x9f",
            b"\x98\x80\n",
            b"\xe2\x82",
            b"x\n",
            b"tab\there\r\n",
        ]
        content = b"".join(rng.choice(parts) for _ in range(400)) + b"end\n"
        whole = content.decode("utf-8", "replace")
        follower = self.follower(offset=0, max_piece=24)
        pieces = []
        position = 0
        while position < len(content):
            step = rng.randint(1, 40)  # splits lines and UTF-8 sequences
            self.append(content[position : position + step])
            position += step
            pieces.extend(follower.read(max_bytes=rng.randint(1, 100)))
        pieces.extend(read_all(follower))
        self.assertEqual(text_of(pieces), whole)
        before = ""
        for piece in pieces:
            self.assertTrue(piece.text)
            self.assertEqual(piece.data, piece.text.encode("utf-8"))
            before += piece.text
            self.assertEqual(content[: piece.offset].decode("utf-8", "replace"), before)
        for piece in rng.sample(pieces, 40):
            before = content[: piece.offset].decode("utf-8", "replace")
            rest = text_of(read_all(self.follower(offset=piece.offset)))
            self.assertEqual(before + rest, whole)


class ReadBufferTests(FollowTestCase):
    def test_reused_read_buffers_never_change_a_live_piece(self):
        size = 256 * 1024
        blocks = [bytes([0x41 + n % 26]) * (size - 1) + b"\n" for n in range(40)]
        self.append(b"".join(blocks))
        follower = self.follower(offset=0, max_piece=size)
        kept, buffers = [], set()
        for n in range(40):
            [piece] = follower.read(max_bytes=size)
            buffers.add(id(piece.data))
            if n % 3 == 0:
                kept.append((n, piece))  # alive: its buffer must not be reused
            del piece
        for n, piece in kept:
            self.assertEqual(bytes(piece.data), blocks[n], n)
            self.assertEqual(piece.offset, (n + 1) * size)
        # Buffers were reused (fewer than pieces), but never a kept one.
        self.assertLess(len(buffers), 40 - len(kept))


class DecodingWithTheDecoderTests(DecodingTests):
    """The same, where the C check (_utf8.c) is not built: CPython's decoder."""

    def setUp(self):
        super().setUp()
        self.addCleanup(setattr, utf8, "_c_check_utf8", utf8._c_check_utf8)
        utf8._c_check_utf8 = None


class RotationTests(FollowTestCase):
    use_inotify = True

    def follower(self, path=None, **options):
        return super().follower(path, use_inotify=self.use_inotify, **options)

    def wait(self, follower):
        if follower.fileno() >= 0:
            self.assertIsNotNone(readable_within(follower.fileno(), 1.0))

    def test_rename_rotation_reads_the_old_file_to_its_end_then_the_new_from_zero(self):
        self.append("1\n")
        follower = self.follower(offset=0)
        self.assertEqual(text_of(follower.read()), "1\n")
        with open(self.path, "ab", buffering=0) as writer:
            writer.write(b"2\n")
            os.rename(self.path, self.path + ".1")
            self.wait(follower)
            writer.write(b"3\n\xc3")  # still writing to the old file after the rename
            self.append("new\n")
        pieces = read_all(follower)
        self.assertEqual(text_of(pieces), "2\n3\n\ufffdnew\n")
        self.assertEqual(pieces[-1].offset, 4)
        self.append("more\n")
        self.wait(follower)
        self.assertEqual(follower.read(), [Piece("more\n", 9)])

    def test_copytruncate_rereads_from_zero(self):
        self.append("a long first line\n" * 10)
        follower = self.follower()
        os.truncate(self.path, 0)
        self.append("fresh\n")
        self.wait(follower)
        self.assertEqual(follower.read(), [Piece("fresh\n", 6)])

    def test_copytruncate_that_regrew_past_our_position_rereads_from_zero(self):
        # The writer truncates and writes more than we had read before the
        # follower looks again: the size alone cannot tell (tail -F's hole).
        self.append("old line one\nold line two\n")
        follower = self.follower(offset=0)
        self.assertEqual(text_of(read_all(follower)), "old line one\nold line two\n")
        os.truncate(self.path, 0)
        self.append("NEW content, longer than the old one was\n")
        self.assertEqual(text_of(read_all(follower)), "NEW content, longer than the old one was\n")

    def test_a_file_that_only_grew_is_not_reread(self):
        self.append("one\n")
        follower = self.follower(offset=0)
        self.assertEqual(text_of(read_all(follower)), "one\n")
        self.append("two\n")
        self.assertEqual(follower.read(), [Piece("two\n", 8)])

    def test_deleted_then_recreated_file_is_followed_from_zero(self):
        self.append("x\n")
        follower = self.follower()
        os.unlink(self.path)
        self.wait(follower)
        self.assertEqual(follower.read(), [])
        self.assertEqual(follower.size, 2)  # still the deleted file
        self.append("again\n")
        self.wait(follower)
        self.assertEqual(follower.read(), [Piece("again\n", 6)])

    def test_missing_file_is_followed_once_created(self):
        follower = self.follower(offset=100)
        self.assertEqual((follower.read(), follower.size), ([], 0))
        self.append("born\n")
        self.wait(follower)
        self.assertEqual(follower.read(), [Piece("born\n", 5)])


class RotationWithoutInotifyTests(RotationTests):
    use_inotify = False

    def test_fileno_is_minus_one(self):
        self.assertEqual(self.follower().fileno(), -1)

    def test_no_inotify_in_libc(self):
        with mock.patch.object(inotify, "api", lambda: None):
            follower = LogFollower(self.path)
            self.addCleanup(follower.close)
            follower.open()
        self.assertEqual(follower.fileno(), -1)
        self.append("seen\n")
        self.assertEqual(text_of(follower.read()), "seen\n")


class SecurityTests(FollowTestCase):
    def setUp(self):
        super().setUp()
        self.secret = os.path.join(self.dir, "secret")
        with open(self.secret, "w") as file:
            file.write("SECRET\n")

    def assert_unavailable(self, reason, **options):
        with self.assertRaises(LogUnavailable) as raised:
            self.follower(**options)
        self.assertIn(reason, str(raised.exception))

    def test_symlink_is_refused(self):
        os.symlink(self.secret, self.path)
        self.assert_unavailable("is a symbolic link")

    def test_directory_is_refused(self):
        os.mkdir(self.path)
        self.assert_unavailable("is not a regular file")

    def test_fifo_is_refused_without_blocking(self):
        os.mkfifo(self.path)
        self.assert_unavailable("is not a regular file")

    def test_missing_directory_is_refused(self):
        with self.assertRaises(LogUnavailable) as raised:
            self.follower(os.path.join(self.dir, "nowhere", "event.log"))
        self.assertIn("does not exist", str(raised.exception))

    def test_unreadable_file_is_refused(self):
        self.append("private\n")
        os.chmod(self.path, 0)
        if os.geteuid() != 0:
            self.assert_unavailable("is not readable (permission denied)")
            return
        # Root reads everything: ask as nobody, in a forked child, so that no
        # other thread of this process ever runs under another uid.
        os.chmod(self.dir, 0o755)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            reason = b"opened"
            try:
                os.setresuid(65534, 65534, 65534)
                LogFollower(self.path).open()
            except LogUnavailable as error:
                reason = str(error).encode()
            finally:
                os.write(write_end, reason)
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            reason = pipe.read().decode()
        os.waitpid(pid, 0)
        self.assertIn("is not readable (permission denied)", reason)

    def test_swapped_for_a_symlink_reads_nothing_more_and_raises(self):
        self.append("before\n")
        follower = self.follower(offset=0)
        self.assertEqual(text_of(follower.read()), "before\n")
        self.append("unread\n")
        os.rename(self.path, self.path + ".1")
        os.symlink(self.secret, self.path)
        for _ in range(2):  # and on every read after
            with self.assertRaises(LogUnavailable) as raised:
                follower.read()
            self.assertIn("is a symbolic link", str(raised.exception))
        self.assertFalse(follower.ended)

    def test_missing_file_created_as_a_symlink_raises(self):
        follower = self.follower()
        os.symlink(self.secret, self.path)
        with self.assertRaises(LogUnavailable):
            follower.read()

    def test_swapped_for_a_fifo_raises(self):
        follower = self.follower()
        os.mkfifo(self.path)
        with self.assertRaises(LogUnavailable) as raised:
            follower.read()
        self.assertIn("is not a regular file", str(raised.exception))

    def test_a_second_hard_link_is_refused(self):
        self.append("x\n")
        os.link(self.path, os.path.join(self.dir, "other"))
        with self.assertRaisesRegex(LogUnavailable, "has 2 hard links"):
            self.follower()

    def test_a_hard_link_moved_in_place_raises_without_a_byte_of_it(self):
        self.append("mine\n")
        follower = self.follower(offset=0)
        self.assertEqual(text_of(read_all(follower)), "mine\n")
        secret = os.path.join(self.dir, "secret")
        self.append("TOP SECRET\n", path=secret)
        os.link(secret, self.path + ".tmp")
        os.rename(self.path + ".tmp", self.path)
        with self.assertRaisesRegex(LogUnavailable, "hard links"):
            follower.read()

    def test_a_pseudo_file_whose_size_reads_zero_is_refused(self):
        # /proc's files say 0 bytes and return data: followed, they would be
        # sent again from their start at every change.
        with self.assertRaisesRegex(LogUnavailable, "pseudo-file"):
            self.follower(path="/proc/self/status")

    def test_a_read_error_is_log_unavailable_not_an_oserror(self):
        self.append("x\n")
        follower = self.follower(offset=0)
        # A real EISDIR from pread(): the follower's fd swapped for a
        # directory's, as a failing disk would fail the read.
        directory_fd = os.open(self.dir, os.O_RDONLY)
        os.dup2(directory_fd, follower._file.fd)
        os.close(directory_fd)
        with self.assertRaisesRegex(LogUnavailable, "cannot be read"):
            follower._read_into([], 100, final=False)
        with self.assertRaises(LogUnavailable):
            follower.read()  # and on every call after


class LastLinesScanTests(FollowTestCase):
    def test_open_does_not_scan_the_first_read_does(self):
        self.append("".join(f"line {n}\n" for n in range(1000)))
        follower = self.follower(last_lines=2)
        # open() ran in the request thread and read nothing backwards yet.
        self.assertEqual(follower.offset, os.path.getsize(self.path))
        self.assertEqual(text_of(read_all(follower)), "line 998\nline 999\n")

    def test_the_scan_is_bounded_in_bytes(self):
        self.append("".join(f"line {n:05d}\n" for n in range(10000)))  # 11 bytes a line
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        size = os.path.getsize(self.path)
        start = follow._start_of_last_lines(fd, size, 10**6, max_bytes=1100)
        # The first line that starts within the last 1,100 bytes.
        self.assertEqual(start, size - 1100)
        self.assertEqual(os.pread(fd, 11, start), b"line 09900\n")
        self.assertEqual(follow._start_of_last_lines(fd, size, 3, max_bytes=1100), size - 33)

    def test_a_long_line_past_the_bound_starts_at_the_bound(self):
        self.append("x" * 5000 + "\n")
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        self.assertEqual(follow._start_of_last_lines(fd, 5001, 10, max_bytes=100), 4901)


class LifecycleTests(FollowTestCase):
    def test_context_manager_and_idempotent_close(self):
        with LogFollower(self.path) as follower:
            self.assertGreaterEqual(follower.fileno(), 0)
        self.assertEqual(follower.fileno(), -1)
        self.assertEqual(follower.read(), [])
        follower.close()

    def test_read_after_close_without_open_returns_nothing(self):
        follower = LogFollower(self.path)
        follower.close()
        self.assertEqual((follower.read(), follower.fileno()), ([], -1))

    def test_core_module_imports_no_zope(self):
        script = (
            "import json, sys; import collective.streamguard.logs.follower; "
            "print(json.dumps(sorted(sys.modules)))"
        )
        result = subprocess.run(
            [sys.executable, "-S", "-c", script],
            env={"PYTHONPATH": SRC},
            capture_output=True,
            timeout=30,
            check=True,
        )
        roots = {name.split(".")[0] for name in json.loads(result.stdout)}
        self.assertFalse(roots & {"zope", "Products", "plone", "ZODB", "transaction"})
