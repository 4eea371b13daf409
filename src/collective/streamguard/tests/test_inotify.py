"""Followers share the process' one inotify instance (``inotify``), and the
followers of one path share its descriptors (``follow.LogSource``).

Linux allows 128 inotify instances per user: with one per follower the
129th polled.  A parked log stream used to hold its file, its directory and
an eventfd besides its socket; now the followers of a path hold two
descriptors between them and are told of changes by a callback.
"""

import os
import select
import shutil
import tempfile
import threading
import time
import unittest

from collective.streamguard import hub as hubs
from collective.streamguard.logs import inotify
from collective.streamguard.logs.follower import LogFollower
from collective.streamguard.logs.follower import Piece


def inotify_instances():
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                count += 1
        except OSError:
            pass
    return count


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def all_readable(fds, timeout=10.0):
    """Wait until every fd of ``fds`` is readable; the ones that are not."""
    deadline = time.monotonic() + timeout
    waiting = set(fds)
    while waiting and time.monotonic() < deadline:
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        for fd, _events in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            waiting.discard(fd)
    return waiting


def text(pieces):
    return "".join(piece.text for piece in pieces)


class FollowersTestCase(unittest.TestCase):
    def setUp(self):
        if inotify.shared() is None:
            self.skipTest("no inotify here")
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "app.log")
        self.append("start\n")

    def append(self, text, path=None):
        with open(path or self.path, "a") as f:
            f.write(text)

    def followers(self, count):
        followers = [LogFollower(self.path) for _ in range(count)]
        for follower in followers:
            follower.open()
            self.addCleanup(follower.close)
        return followers


class SharedInotifyTests(FollowersTestCase):
    def test_more_followers_than_the_per_user_inotify_limit_all_wake(self):
        before = inotify_instances()
        followers = self.followers(300)
        self.assertEqual(inotify_instances(), before)
        self.assertTrue(all(follower.fileno() >= 0 for follower in followers))
        self.append("one line\n")
        self.assertEqual(all_readable([f.fileno() for f in followers]), set())
        for follower in followers:
            self.assertEqual(b"".join(p.data for p in follower.read()), b"one line\n")

    def test_a_follower_of_another_file_in_the_directory_is_not_woken(self):
        [mine] = self.followers(1)
        other_path = os.path.join(self.dir, "other.log")
        self.append("x\n", other_path)
        other = LogFollower(other_path)
        other.open()
        self.addCleanup(other.close)
        mine.read()
        os.rename(other_path, other_path + ".1")
        self.assertEqual(all_readable([other.fileno()]), set())
        self.assertEqual(all_readable([mine.fileno()], timeout=0.1), {mine.fileno()})

    def test_rotation_and_closing_leave_the_shared_watches_consistent(self):
        followers = self.followers(3)
        os.rename(self.path, self.path + ".1")
        self.append("after rotation\n")
        self.assertEqual(all_readable([f.fileno() for f in followers]), set())
        for follower in followers:
            self.assertIn(b"after rotation\n", b"".join(p.data for p in follower.read()))
        for follower in followers:
            follower.close()
        shared = inotify.shared()
        self.assertEqual(
            [wd for wd, subscribers in shared._watches.items() if subscribers],
            [],
        )

    def test_a_new_hub_still_dispatches(self):
        [follower] = self.followers(1)
        hubs.stop_hub()
        inotify.shared()  # as every new follower does
        self.append("after a new hub\n")
        self.assertEqual(all_readable([follower.fileno()]), set())


class SharedSourceTests(FollowersTestCase):
    def test_followers_of_one_path_hold_two_descriptors_between_them(self):
        before = open_fds()
        followers = self.followers(200)
        # The pinned directory and the file: not 3 per follower.
        self.assertEqual(open_fds() - before, 2)
        for follower in followers:
            follower.close()
        self.assertEqual(open_fds(), before)

    def test_on_change_tells_every_follower_and_notified_reads_agree(self):
        followers = self.followers(50)
        told = threading.Semaphore(0)
        for follower in followers:
            follower.on_change(told.release)
            self.assertEqual(follower.read(notified=True), [])
        self.append("one line\n")
        for _ in followers:
            self.assertTrue(told.acquire(timeout=10))
        size = os.path.getsize(self.path)
        for follower in followers:
            self.assertEqual(follower.read(notified=True), [Piece("one line\n", size)])
            # Read to the end: nothing until the next change.
            self.assertEqual(follower.read(notified=True), [])

    def test_a_rotated_file_stays_open_until_its_last_reader_has_read_it(self):
        first, second = self.followers(2)
        first.read(), second.read()
        before = open_fds()
        with open(self.path, "a") as writer:
            os.rename(self.path, self.path + ".1")
            self.append("new file\n")
            writer.write("last words\n")
        self.assertEqual(text(first.read()), "last words\nnew file\n")
        # The rotated file stays open for the second follower, the new one
        # is shared: one more descriptor than before, not two.
        self.assertEqual(open_fds() - before, 1)
        self.assertEqual(text(second.read()), "last words\nnew file\n")
        self.assertEqual(open_fds() - before, 0)

    def test_fileno_made_after_a_change_is_readable_at_once(self):
        [follower] = self.followers(1)
        follower.read()
        told = threading.Event()
        follower.on_change(told.set)
        self.append("before fileno\n")
        self.assertTrue(told.wait(10))
        fd = follower.fileno()
        self.assertEqual(all_readable([fd]), set())
        self.assertEqual(text(follower.read()), "before fileno\n")

    def test_followers_in_different_states_each_read_their_own(self):
        at_end = self.followers(3)
        from_start = [LogFollower(self.path, offset=0) for _ in range(3)]
        stopping = [LogFollower(self.path, end_marker="STOP") for _ in range(3)]
        for follower in from_start + stopping:
            follower.open()
            self.addCleanup(follower.close)
        everyone = at_end + from_start + stopping
        told = threading.Semaphore(0)
        for follower in everyone:
            follower.on_change(told.release)
        self.append("STOP here\nmore\n")
        for _ in everyone:
            self.assertTrue(told.acquire(timeout=10))
        for follower in at_end:
            self.assertEqual(text(follower.read(notified=True)), "STOP here\nmore\n")
        for follower in from_start:
            self.assertEqual(text(follower.read(notified=True)), "start\nSTOP here\nmore\n")
        for follower in stopping:
            self.assertEqual(follower.read(notified=True), [])
            self.assertTrue(follower.ended)
