"""The guard's bookkeeping, without a server: endings and cleanups run once,
in order, whatever raises; a dropped body still gives its slot back.

The connection is the "unknown server" one (treated as open); the tests
with real clients leaving are in test_streaming and test_connection_*.
"""

import gc
import threading
import time
import unittest

from collective.streamguard.guard import GuardedStream
from collective.streamguard.guard import StreamGuard
from collective.streamguard.probes import UnknownConnection
from collective.streamguard.streams import EndReason
from collective.streamguard.streams import LiveStreams
from collective.streamguard.streams import Refused


class TestCleanups(unittest.TestCase):
    def setUp(self):
        self.live_streams = LiveStreams()
        self.guard = StreamGuard(UnknownConnection(), live_streams=self.live_streams)
        self.calls = []

    def stream(self, producer):
        return GuardedStream(producer, self.guard)

    def test_a_cleanup_that_raises_is_logged_and_the_others_still_run_once(self):
        def failing():
            self.calls.append("failing")
            raise RuntimeError("cleanup failed on purpose")

        self.guard.add_cleanup(self.calls.append, "first added")
        self.guard.add_cleanup(failing)
        self.guard.add_cleanup(self.calls.append, "last added")
        self.guard.add_ending(self.calls.append, "ending")
        stream = self.stream(iter([b"a", b"b"]))
        with self.assertLogs("collective.streamguard", "ERROR") as logged:
            self.assertEqual(list(stream), [b"a", b"b"])
        stream.close()
        stream.close()
        self.assertEqual(self.calls, ["ending", "last added", "failing", "first added"])
        self.assertIn("cleanup failed on purpose", "\n".join(logged.output))
        self.assertEqual(self.guard.reason, EndReason.FINISHED)
        self.assertEqual(self.live_streams.snapshot()["ended"]["finished"], 1)

    def test_producer_error_ends_with_error_and_reraises(self):
        def producer():
            yield b"one"
            raise ValueError("boom")

        self.guard.add_cleanup(lambda: self.calls.append(self.guard.reason))
        stream = self.stream(producer())
        self.assertEqual(next(stream), b"one")
        with self.assertLogs("collective.streamguard", "ERROR"), self.assertRaises(ValueError):
            next(stream)
        stream.close()
        self.assertEqual(self.calls, [EndReason.ERROR])

    def test_server_closing_early_stops_the_generator_with_generatorexit(self):
        def producer():
            try:
                yield b"one"
                yield b"two"
            except GeneratorExit:
                self.calls.append("GeneratorExit")
                raise

        stream = self.stream(producer())
        next(stream)
        stream.close()  # what waitress does after a failed write
        self.assertEqual(self.calls, ["GeneratorExit"])
        self.assertEqual(self.guard.reason, EndReason.CLIENT_GONE)

    def test_a_dropped_body_gives_its_slot_back_and_runs_its_cleanups(self):
        self.assertIsNone(self.live_streams.reserve(1))
        self.assertIs(self.live_streams.reserve(1), Refused.BUSY)
        self.guard.add_cleanup(self.calls.append, "cleaned")
        stream = GuardedStream(iter([b"x"]), self.guard, reserved=True)
        with self.assertLogs("collective.streamguard", "WARNING"):
            del stream
            gc.collect()
        self.assertEqual(self.calls, ["cleaned"])
        self.assertIsNone(self.live_streams.reserve(1))
        self.assertEqual(self.live_streams.snapshot()["ended"]["error"], 1)

    def test_a_body_dropped_while_a_stream_starts_in_the_same_thread_does_not_deadlock(self):
        # The garbage collector runs a dropped body's finalizer wherever it
        # runs: here, as if inside LiveStreams.start(), with its lock held.
        stream = GuardedStream(iter([b"x"]), self.guard)
        record = stream.record
        done = threading.Event()

        def starting_when_the_collector_runs():
            with self.live_streams._lock:
                self.live_streams.discard(record)
            done.set()

        with self.assertLogs("collective.streamguard", "WARNING"):
            thread = threading.Thread(target=starting_when_the_collector_runs, daemon=True)
            thread.start()
            self.assertTrue(done.wait(5), "discard() deadlocked on the live streams' lock")
        self.assertEqual(self.live_streams.snapshot()["ended"]["error"], 1)

    def test_strings_are_encoded(self):
        self.assertEqual(list(self.stream(iter(["é"]))), ["é".encode()])


class TestWaiting(unittest.TestCase):
    def test_wake_interrupts_a_wait_at_once(self):
        guard = StreamGuard(UnknownConnection(), live_streams=LiveStreams())
        timer = threading.Timer(0.1, guard.wake)
        timer.start()
        self.addCleanup(timer.join)
        started = time.monotonic()
        self.assertFalse(guard.wait(30))
        self.assertLess(time.monotonic() - started, 10)

    def test_maximum_duration_ends_a_wait(self):
        guard = StreamGuard(UnknownConnection(), max_duration=0.2, live_streams=LiveStreams())
        self.assertTrue(guard.wait(30))
        self.assertEqual(guard.check(), EndReason.TIMEOUT)

    def test_idle_yields_heartbeats(self):
        guard = StreamGuard(
            UnknownConnection(),
            heartbeat=b": hb\n\n",
            heartbeat_interval=0.05,
            live_streams=LiveStreams(),
        )
        beats = []
        idle = guard.idle(timeout=0.3)
        try:
            while True:
                beats.append(next(idle))
                guard.last_output = time.monotonic()
        except StopIteration as stop:
            self.assertFalse(stop.value)
        self.assertGreaterEqual(len(beats), 2)
        self.assertEqual(set(beats), {b": hb\n\n"})

    def test_shutdown_stops_a_wait(self):
        live_streams = LiveStreams()
        guard = StreamGuard(UnknownConnection(), live_streams=live_streams)
        timer = threading.Timer(0.1, live_streams.begin_shutdown)
        timer.start()
        self.addCleanup(timer.join)
        # begin_shutdown wakes only registered streams; a bare guard sees
        # the flag on its next re-check.
        self.assertTrue(guard.wait(30))
        self.assertEqual(guard.check(), EndReason.SHUTDOWN)
