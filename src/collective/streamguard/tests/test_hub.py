"""The hub's own machinery: calls from other threads are never left waiting."""

import os
import threading
import unittest
from unittest import mock

from collective.streamguard import hub as hubs


class ReadHook:
    """``os`` as the hub module sees it, with a hook that runs once inside
    the hub's read of its eventfd: the moment the read's system call lets
    the GIL go, when another thread may call ``call_soon()``."""

    def __init__(self, hook):
        self.hook = hook

    def __getattr__(self, name):
        return getattr(os, name)

    def eventfd_read(self, fd):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return os.eventfd_read(fd)


@unittest.skipUnless(hubs.SUPPORTED, "the hub needs epoll and eventfd (Linux)")
class TestCallSoon(unittest.TestCase):
    def start_hub(self):
        hub = hubs.Hub()
        self.addCleanup(hub.stop)
        return hub

    def test_a_call_made_during_the_hubs_eventfd_read_leaves_later_calls_a_wake(self):
        # A call_soon() whose write the hub's read consumed left the "a
        # write is pending" flag up with nothing to read: every later
        # call_soon() skipped its write and waited for the epoll timeout
        # (TICK, 1 s).  With TICK an hour, such a call would never run here.
        ran = {name: threading.Event() for name in ("first", "during", "later")}

        def during_the_read():
            hub.call_soon(ran["during"].set)

        with (
            mock.patch.object(hubs, "TICK", 3600.0),
            mock.patch.object(hubs, "os", ReadHook(during_the_read)),
        ):
            hub = self.start_hub()
            hub.call_soon(ran["first"].set)
            self.assertTrue(ran["first"].wait(10))
            self.assertTrue(ran["during"].wait(10))
            hub.call_soon(ran["later"].set)
            self.assertTrue(ran["later"].wait(10), "a call_soon() after it never ran")

    def test_calls_from_many_threads_all_run(self):
        hub = self.start_hub()
        count = 2000
        done = threading.Semaphore(0)

        def caller():
            for _ in range(count // 4):
                hub.call_soon(done.release)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for _ in range(count):
            self.assertTrue(done.acquire(timeout=10))
