"""SSE ids of ``@@stream-log`` (``logs.position``) and the follower's resume, on
real files in a temporary directory: plain Python, no Zope."""

import os
import shutil

from collective.streamguard.logs.position import HEAD
from collective.streamguard.logs.position import TAIL
from collective.streamguard.logs.position import ResumePoint
from collective.streamguard.logs.position import Switch
from collective.streamguard.logs.position import event_id
from collective.streamguard.tests.test_follow import FollowTestCase
from collective.streamguard.tests.test_follow import read_all


def expected_id(path, offset):
    """The id of ``offset`` in the file at ``path``, from the file alone."""
    info = os.stat(path)
    with open(path, "rb") as file:
        content = file.read()
    head = content[: min(HEAD, offset)]
    tail = content[max(0, offset - TAIL) : offset]
    return event_id((info.st_dev, info.st_ino), head, tail, offset)


class TestParse(FollowTestCase):
    def test_ids_and_plain_offsets_parse(self):
        self.assertEqual(
            ResumePoint.parse("0123456789abcdef-42"), ResumePoint(42, "0123456789abcdef")
        )
        self.assertEqual(ResumePoint.parse("42"), ResumePoint(42, None))

    def test_anything_else_is_a_point_in_no_file(self):
        for text in (
            "",
            "x",
            "-1",
            "42-",
            "0123456789abcdef-",
            "0123456789ABCDEF-1",
            "1" * 16,
            None,
        ):
            with self.subTest(text=text):
                point = ResumePoint.parse(text)
                self.assertEqual(point, ResumePoint(None))
                self.assertEqual(point.check(-1, (0, 0), 0), Switch.UNKNOWN_ID)


class TestIdsOfPieces(FollowTestCase):
    def test_every_id_is_the_file_and_offset_it_names(self):
        # Small pieces (shorter than TAIL), pieces across HEAD, a long one,
        # invalid UTF-8: every id is what the file alone gives.
        follower = self.follower(offset=0)
        writes = ["a", "bc\n", "x" * 20, "y" * 50 + "\n", b"bad \xff bytes\n", "z" * 5000 + "\n"]
        for data in writes:
            self.append(data)
            for piece in read_all(follower):
                self.assertEqual(piece.event_id, expected_id(self.path, piece.offset))
            self.assertEqual(follower.event_id, expected_id(self.path, follower.offset))

    def test_ids_of_followers_started_anywhere(self):
        self.append("".join(f"line {n} of the log\n" for n in range(20)))
        for options in ({}, {"offset": 7}, {"last_lines": 3}, {"offset": 0}):
            with self.subTest(**options):
                size = os.path.getsize(self.path)
                follower = self.follower(**options)
                read_all(follower)
                self.assertEqual(follower.offset, size)
                self.assertEqual(follower.event_id, expected_id(self.path, size))
                self.append("one more\n")
                [piece] = read_all(follower)
                self.assertEqual(piece.event_id, expected_id(self.path, piece.offset))

    def test_a_rotated_file_starts_new_ids(self):
        follower = self.follower()
        self.append("before\n")
        read_all(follower)
        os.rename(self.path, self.path + ".1")
        self.append("after\n")
        [piece] = read_all(follower)
        self.assertEqual(piece.event_id, expected_id(self.path, piece.offset))


class TestResume(FollowTestCase):
    def setUp(self):
        super().setUp()
        self.append("first line\nsecond line\nthird line\n")

    def last_id(self):
        follower = self.follower(offset=0)
        read_all(follower)
        return follower.event_id.decode()

    def test_the_same_file_resumes_exactly(self):
        last = self.last_id()
        self.append("fourth line\n")
        follower = self.follower(resume=ResumePoint.parse(last), last_lines=1)
        self.assertIsNone(follower.switched)
        self.assertEqual([p.text for p in read_all(follower)], ["fourth line\n"])

    def test_a_copy_is_another_file(self):
        last = self.last_id()
        other = os.path.join(self.dir, "other.log")
        shutil.copy(self.path, other)
        follower = self.follower(other, resume=ResumePoint.parse(last), last_lines=1)
        self.assertEqual(follower.switched, Switch.OTHER_FILE)
        self.assertEqual([p.text for p in read_all(follower)], ["third line\n"])

    def test_a_plain_offset_must_be_a_line_start_within_the_file(self):
        cases = {"0": None, "11": None, "34": None, "12": Switch.NOT_A_LINE_START}
        cases["35"] = Switch.NOT_A_LINE_START  # past the end
        for text, switched in cases.items():
            with self.subTest(text=text):
                follower = self.follower(resume=ResumePoint.parse(text))
                self.assertEqual(follower.switched, switched)
                self.assertEqual(follower.offset, int(text) if switched is None else 34)

    def test_no_file_at_the_name_is_a_switch(self):
        last = self.last_id()
        os.unlink(self.path)
        follower = self.follower(resume=ResumePoint.parse(last))
        self.assertEqual(follower.switched, Switch.NO_FILE)
        self.assertIsNone(follower.event_id)

    def test_an_id_carries_the_place_in_the_file_left(self):
        last = self.last_id()
        other = os.path.join(self.dir, "other.log")
        self.append("other line\n", path=other)
        on_other = self.follower(other, resume=ResumePoint.parse(last), last_lines=1)
        self.assertEqual(on_other.switched, Switch.OTHER_FILE)
        self.assertEqual(on_other.carried, b"." + last.encode())
        self.assertEqual([p.text for p in read_all(on_other)], ["other line\n"])
        back = (on_other.event_id + on_other.carried).decode()
        # Back on the first file: on where the client left it, not lines=.
        self.append("fourth line\n")
        follower = self.follower(resume=ResumePoint.parse(back), last_lines=3)
        self.assertEqual(follower.switched, Switch.RETURNED)
        self.assertEqual(follower.carried, b"." + on_other.event_id)
        self.assertEqual([p.text for p in read_all(follower)], ["fourth line\n"])

    def test_at_most_three_places_are_carried(self):
        places = [f"{n:016x}-{n}" for n in range(1, 5)]
        self.assertEqual(ResumePoint.parse(".".join(places)).carried[-1].offset, 4)
        self.assertEqual(ResumePoint.parse(".".join([*places, "0" * 16 + "-5"])), ResumePoint(None))
        follower = self.follower(resume=ResumePoint.parse(".".join(places)))
        self.assertEqual(follower.switched, Switch.OTHER_FILE)
        self.assertEqual(follower.carried, "".join("." + p for p in places[:3]).encode())
