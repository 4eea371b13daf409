"""Followers share the process' one inotify instance (``inotify``).

Linux allows 128 inotify instances per user: with one per follower the
129th polled.  Each follower now waits on an eventfd of its own, which the
hub's thread makes readable when the follower's watches fire.
"""

import os
import select
import shutil
import tempfile
import time
import unittest

from collective.streamguard import hub as hubs
from collective.streamguard import inotify
from collective.streamguard.follow import LogFollower


def inotify_instances():
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                count += 1
        except OSError:
            pass
    return count


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


class SharedInotifyTests(unittest.TestCase):
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
