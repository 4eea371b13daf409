"""Parked streams on a real waitress over real sockets (``hub``, ``waitress.park``).

webtest's StopableWSGIServer runs waitress in this process with 4 threads;
``parkapp.App`` streams park while their producers wait in ``guard.idle()``.
Every wait is on a byte or a state, with a deadline.
"""

import logging
import os
import resource
import socket
import threading
import unittest

from collective.streamguard import hub as hubs
from collective.streamguard.parking.group import ParkedGroup
from collective.streamguard.parking.stream import OUT_HIGH
from collective.streamguard.parking.stream import PARKED
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import Recorder
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.parkapp import HEARTBEAT
from collective.streamguard.tests.parkapp import App
from collective.streamguard.tests.parkapp import PollingServer
from collective.streamguard.waitress import park as waitress_park

THREADS = 4


def parked_count(app):
    return sum(
        1
        for record in app.live_streams.live()
        if record.guard.parked is not None and record.guard.parked.state == PARKED
    )


class ParkedStreamsTestCase(unittest.TestCase):
    server_options = {}

    def setUp(self):
        self.recorder = Recorder.attach(self)
        self.app = App()
        options = {
            "threads": THREADS,
            "expose_tracebacks": False,
            "asyncore_use_poll": True,
            "connection_limit": 2000,
            **self.server_options,
        }
        self.server = PollingServer.create(self.app, **options)
        self.addCleanup(self.server.runner.join, 10)
        self.addCleanup(self.server.shutdown)
        self.address = (self.server.adj.host, self.server.adj.port)
        self.assertTrue(self.server.wait())
        waitress_park.install(self.server)
        self.assertTrue(wait_for(lambda: self.server.channel_class is waitress_park.ParkingChannel))
        self.addCleanup(hubs.stop_hub)
        self.addCleanup(self.no_stream_left)

    def no_stream_left(self):
        self.app.live_streams.shutdown(10)
        self.assertEqual(self.app.live_streams.live(), [])
        self.assertTrue(
            wait_for(
                lambda: not [t for t in threading.enumerate() if t.name == "streamguard-ending"]
            )
        )

    def connect(self, path, version="1.1"):
        client = HTTPClient(self.address)
        self.addCleanup(client.close)
        return client.request(path, version=version)

    def open_parked(self, tag, query=""):
        """A client whose stream has sent its first line and parked."""
        client = self.connect(f"/idle?tag={tag}{query}")
        client.head()
        client.read_until(b"start %s\n" % tag.encode())
        self.assertTrue(wait_for(lambda: self.state(tag) == PARKED), f"{tag} did not park")
        return client

    def state(self, tag):
        stream = self.app.stream(tag)
        parked = stream.guard.parked if stream and stream.guard else None
        return parked.state if parked is not None else None

    def ended(self, count=1):
        self.assertTrue(wait_for(lambda: len(self.recorder.ended) >= count, 10))
        return self.recorder.ended

    def page(self):
        with HTTPClient(self.address) as client:
            client.request("/page", headers={"Connection": "close"})
            return client.body()


class TestParking(ParkedStreamsTestCase):
    def test_an_idle_stream_parks_and_gives_its_thread_back(self):
        self.open_parked("a")
        self.assertEqual(self.page(), b"ok")
        dispatcher = self.server.task_dispatcher
        self.assertTrue(wait_for(lambda: dispatcher.active_count == 0))

    def test_parks_resumes_and_parks_again_many_times_with_exact_bytes(self):
        client = self.open_parked("a")
        expected = bytearray(b"start a\n")
        for index in range(200):
            data = b"line %d %s\n" % (index, b"x" * (index * 37 % 3000))
            expected += data
            self.app.send("a", data)
            client.read_until(data)
            self.assertTrue(wait_for(lambda: self.state("a") == PARKED))
        self.app.send("a", b"END")
        self.assertEqual(client.body(), bytes(expected))
        [ended] = self.ended()
        self.assertEqual(ended["reason"], "finished")
        stream = self.app.stream("a")
        self.assertEqual(stream.finally_ran, 1)
        self.assertEqual(stream.cleanups, ["finished"])
        self.assertTrue(client.closed())

    def test_wake_from_another_thread_resumes_on_a_worker_not_the_hub(self):
        client = self.open_parked("a")
        thread = threading.Thread(target=self.app.send, args=("a", b"hello\n"))
        thread.start()
        thread.join(10)
        client.read_until(b"hello\n")
        stream = self.app.stream("a")
        names = {t.ident: t.name for t in threading.enumerate()}
        self.assertTrue(
            all(names.get(ident, "").startswith("waitress") for ident in stream.threads)
        )
        self.assertNotIn(hubs.hub().thread.ident, stream.threads)

    def test_a_readable_fd_of_the_producer_resumes_it(self):
        client = self.open_parked("a", "&fd=1")
        self.app.pipe_write("a", b"via the pipe\n")
        client.read_until(b"via the pipe\n")
        self.assertTrue(wait_for(lambda: self.state("a") == PARKED))

    def test_idle_timeout_resumes_the_producer(self):
        client = self.open_parked("a", "&timeout=0.2")
        client.read_until(b"timeout\n")
        client.read_until(b"timeout\n")

    def test_heartbeats_are_sent_by_the_hub_without_resuming_the_producer(self):
        client = self.open_parked("a", "&heartbeat=0.1")
        parked = self.app.stream("a").guard.parked
        resumes = parked.resumes
        for _ in range(5):
            client.read_until(HEARTBEAT)
        self.assertEqual(parked.resumes, resumes)
        self.assertEqual(self.app.stream("a").threads, {next(iter(self.app.stream("a").threads))})


class TestEndings(ParkedStreamsTestCase):
    def check_ended(self, tag, reason):
        [ended] = self.ended()
        self.assertEqual(ended["reason"], reason)
        stream = self.app.stream(tag)
        self.assertTrue(wait_for(lambda: stream.cleanups == [reason]), stream.cleanups)
        self.assertEqual(stream.finally_ran, 1)
        self.assertTrue(wait_for(lambda: self.state(tag) is None))
        self.assertTrue(wait_for(lambda: hubs.hub().count() == 0))

    def test_client_fin_ends_a_parked_stream(self):
        client = self.open_parked("a")
        client.close()
        self.check_ended("a", "client gone")

    def test_client_reset_ends_a_parked_stream(self):
        client = self.open_parked("a")
        client.reset()
        self.check_ended("a", "client gone")

    def test_half_close_ends_a_parked_stream(self):
        client = self.open_parked("a")
        client.shutdown(socket.SHUT_WR)
        self.check_ended("a", "client gone")
        self.assertTrue(client.closed())

    def test_max_duration_ends_a_parked_stream(self):
        client = self.open_parked("a", "&max=0.3")
        self.assertEqual(client.body(), b"start a\n")
        self.check_ended("a", "timeout")

    def test_a_producer_that_raises_after_resuming_ends_with_error(self):
        client = self.open_parked("a")
        other = self.open_parked("b")
        self.app.send("a", b"before\n")
        client.read_until(b"before\n")
        with self.assertLogs("collective.streamguard", "INFO") as logs:
            self.app.send("a", b"RAISE")
            self.assertTrue(client.closed())
            self.assertTrue(wait_for(lambda: self.app.stream("a").cleanups == ["error"]))
        self.assertIn("producer failed on purpose", "\n".join(logs.output))
        self.assertTrue(any("ended (error)" in line for line in logs.output), logs.output)
        self.assertEqual(self.app.stream("a").finally_ran, 1)
        # No terminating chunk: the client sees a truncated body.
        self.assertFalse(bytes(client.transcript).endswith(b"0\r\n\r\n"))
        # Nothing else disturbed.
        self.app.send("b", b"still here\n")
        other.read_until(b"still here\n")
        self.assertEqual(self.page(), b"ok")

    def test_shutdown_ends_parked_streams_at_once(self):
        clients = [self.open_parked(tag) for tag in "abc"]
        left = self.app.live_streams.shutdown(10)
        self.assertEqual(left, 0)
        for tag, client in zip("abc", clients, strict=True):
            self.assertEqual(client.body(), b"start %s\n" % tag.encode())
            stream = self.app.stream(tag)
            self.assertEqual(stream.cleanups, ["shutdown"])
            self.assertEqual(stream.finally_ran, 1)


class TestShutdownWhileDetaching(ParkedStreamsTestCase):
    def test_shutdown_before_the_io_thread_lets_go_of_the_socket(self):
        # At SIGTERM waitress' loop may stop before it runs the thunk that
        # hands the socket over: the stream still ends and runs its cleanups.
        client = self.connect("/idle?tag=a&gate=1")
        self.assertTrue(wait_for(lambda: self.app.stream("a") and self.app.stream("a").guard))
        stream = self.app.stream("a")
        blocked, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def block_io_thread():
            blocked.set()
            release.wait(10)

        self.server.trigger.pull_trigger(block_io_thread)
        self.assertTrue(blocked.wait(10))
        stream.gate.set()  # the producer idles: the stream parks, its thunk waits
        self.assertTrue(wait_for(lambda: self.state("a") == "detaching"))
        self.assertEqual(self.app.live_streams.shutdown(10), 0)
        self.assertEqual(stream.cleanups, ["shutdown"])
        self.assertEqual(stream.finally_ran, 1)
        release.set()
        self.assertTrue(client.closed())


class TestFallback(ParkedStreamsTestCase):
    def test_a_blocking_producer_holds_its_thread_and_ends_on_disconnect(self):
        client = self.connect("/idle?tag=a&blocking=1")
        client.read_until(b"start a\n")
        self.app.send("a", b"woken\n")
        client.read_until(b"woken\n")
        self.assertIsNone(self.state("a"))
        self.assertTrue(wait_for(lambda: self.server.task_dispatcher.active_count == 1))
        client.close()
        [ended] = self.ended()
        self.assertEqual(ended["reason"], "client gone")
        self.assertEqual(self.app.stream("a").finally_ran, 1)

    def test_a_middleware_in_between_holds_the_thread(self):
        client = self.connect("/wrapped?tag=a")
        client.read_until(b"start a\n")
        self.app.send("a", b"woken\n")
        client.read_until(b"woken\n")
        self.assertIsNone(self.state("a"))
        self.app.send("a", b"END")
        self.assertEqual(client.body(), b"start a\nwoken\n")
        [ended] = self.ended()
        self.assertEqual(ended["reason"], "finished")

    def test_http10_streams_park_and_end_with_the_close(self):
        client = self.connect("/idle?tag=a", version="1.0")
        client.read_until(b"start a\n")
        self.assertTrue(wait_for(lambda: self.state("a") == PARKED))
        self.app.send("a", b"more\n")
        client.read_until(b"more\n")
        self.app.send("a", b"END")
        self.assertEqual(client.body(), b"start a\nmore\n")


class TestBackpressure(ParkedStreamsTestCase):
    def test_a_client_that_stops_reading_bounds_memory_and_loses_nothing(self):
        client = self.open_parked("a")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        stream = self.app.stream("a")
        parked = stream.guard.parked
        piece = b"y" * 60_000 + b"\n"
        expected = bytearray(b"start a\n")
        # Far more than the kernel buffers hold while the client reads nothing.
        for index in range(300):
            data = b"%06d" % index + piece
            expected += data
            stream.queue.append(data)
        stream.guard.wake()
        self.assertTrue(wait_for(lambda: parked.state == PARKED and parked.out.size > OUT_HIGH))
        # Parked by backpressure: the rest is still queued in the producer.
        self.assertLess(parked.out.size, OUT_HIGH + 2 * len(data))
        self.assertGreater(len(stream.queue), 0)
        self.app.send("a", b"END")
        self.assertEqual(client.body(timeout=30), bytes(expected))

    def fill(self, tag):
        """Queue far more than the buffers hold for a client that reads nothing."""
        stream = self.app.stream(tag)
        parked = stream.guard.parked
        for index in range(300):
            stream.queue.append(b"%06d" % index + b"z" * 60_000 + b"\n")
        stream.guard.wake()
        self.assertTrue(wait_for(lambda: parked.state == PARKED and parked.out.size > OUT_HIGH))
        return stream

    def test_a_stream_parked_by_backpressure_ends_at_shutdown(self):
        client = self.open_parked("a")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        stream = self.fill("a")
        self.assertEqual(self.app.live_streams.shutdown(10), 0)
        self.assertEqual(stream.cleanups, ["shutdown"])
        self.assertEqual(stream.finally_ran, 1)

    def test_a_stream_parked_by_backpressure_ends_when_the_client_leaves(self):
        client = self.open_parked("a")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        stream = self.fill("a")
        client.reset()
        self.assertTrue(wait_for(lambda: stream.cleanups == ["client gone"]), stream.cleanups)
        self.assertEqual(stream.finally_ran, 1)


class TestManyStreams(ParkedStreamsTestCase):
    COUNT = 600  # 1,200 sockets in this process: fds above 1024 too

    def setUp(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        if hard < 4 * self.COUNT:
            self.skipTest(f"needs {4 * self.COUNT} open files, the limit is {hard}")
        super().setUp()

    def test_600_parked_streams_on_4_threads_while_pages_answer(self):
        self.page()  # the hub and waitress' own fds are there before we count
        fds_before = len(os.listdir("/proc/self/fd"))
        clients = []
        for index in range(self.COUNT):
            client = HTTPClient(self.address, timeout=30)
            self.addCleanup(client.close)
            client.request(f"/idle?tag=s{index}")
            clients.append(client)
        for index, client in enumerate(clients):
            client.read_until(b"start s%d\n" % index, timeout=60)
        self.assertTrue(wait_for(lambda: parked_count(self.app) == self.COUNT, 60))
        # The client's socket and the server's, nothing else per stream (the
        # guards' wake pipes are gone; the hub's epoll and eventfd are shared).
        self.assertLessEqual(len(os.listdir("/proc/self/fd")) - fds_before, 2 * self.COUNT + 4)
        self.assertTrue(wait_for(lambda: self.server.task_dispatcher.active_count == 0))
        self.assertEqual(self.page(), b"ok")
        for index in range(0, self.COUNT, 7):
            self.app.send(f"s{index}", b"to %d\n" % index)
        for index in range(0, self.COUNT, 7):
            clients[index].read_until(b"to %d\n" % index, timeout=30)
        self.assertEqual(self.page(), b"ok")
        for client in clients[::2]:
            client.close()
        self.assertTrue(wait_for(lambda: len(self.recorder.ended) == self.COUNT // 2, 60))
        self.assertEqual({e["reason"] for e in self.recorder.ended}, {"client gone"})
        self.assertEqual(self.page(), b"ok")


class TestQueueWarnings(unittest.TestCase):
    def test_step_runners_do_not_log_waitress_queue_depth(self):
        # Such a line in the event log would wake every parked follower of it.
        queue = logging.getLogger("waitress.queue")

        class Dispatcher:
            def add_task(self, task):
                queue.warning("Task queue depth is %d", 1)

        # Not within a second of another queue warning of this process
        # (those go once a second: test_admission).
        waitress_park.queue_warnings.reset()
        with self.assertLogs("waitress.queue") as logs:
            waitress_park._add_runner(Dispatcher(), object())
            queue.warning("Task queue depth is %d", 2)
        self.assertEqual(logs.output, ["WARNING:waitress.queue:Task queue depth is 2"])


if not (hubs.SUPPORTED and waitress_park.SUPPORTED):  # pragma: no cover
    del TestParking, TestEndings, TestFallback, TestBackpressure, TestManyStreams
    del TestQueueWarnings, TestShutdownWhileDetaching


TCP_CLOSE = 7  # <netinet/tcp.h>: tcpi_state of a connection the peer reset


def tcp_state(sock):
    """The kernel's TCP state of ``sock`` (TCP_INFO; reading it changes nothing)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


class TestParkedGroups(ParkedStreamsTestCase):
    """``parking.group.ParkedGroup``: parked streams sent the same bytes by
    one loop in the hub, and what happens to a member that leaves."""

    def in_hub(self, function, *args):
        """``function(*args)`` in the hub's thread; its result."""
        done = threading.Event()
        outcome = []

        def run():
            try:
                outcome.append((True, function(*args)))
            except BaseException as error:  # handed to the test's thread
                outcome.append((False, error))
            finally:
                done.set()

        hubs.hub().call_soon(run)
        self.assertTrue(done.wait(10))
        [(ok, value)] = outcome
        if not ok:
            raise value
        return value

    def grouped(self, tags, query=""):
        """Parked streams whose producers have a wake step, in one group
        (its token an int), and their clients."""
        clients = [self.open_parked(tag, "&wakestep=1" + query) for tag in tags]
        self.restored = []
        group = ParkedGroup(
            0,
            lambda tag, token: True,
            lambda tag, token: self.restored.append((tag, token)),
        )
        for tag in tags:
            guard = self.app.stream(tag).guard
            self.assertTrue(self.in_hub(guard.join_parked_group, group, tag))
        self.assertEqual(len(group), len(tags))
        return clients, group

    def parked(self, tag):
        return self.app.stream(tag).guard.parked

    def end_all(self, tags, clients):
        for tag in tags:
            self.app.send(tag, b"END")
        return [client.body(timeout=30) for client in clients]

    def test_a_group_sends_each_member_the_same_chunk_without_a_step(self):
        tags = ["a", "b", "c"]
        clients, group = self.grouped(tags)
        resumes = [self.parked(tag).resumes for tag in tags]
        lines = [b"group line %d\n" % number for number in range(3)]
        for token, line in enumerate(lines, 1):
            self.in_hub(group.send, line, token)
            for client in clients:
                client.read_until(line)
        self.assertEqual([self.parked(tag).resumes for tag in tags], resumes)
        self.assertEqual(len(group), 3)
        # Counted when asked (the status view) or when the stream leaves.
        for tag in tags:
            self.parked(tag).settle_group()
        self.assertEqual([self.parked(tag).shared_sends for tag in tags], [3, 3, 3])
        bodies = self.end_all(tags, clients)
        self.assertEqual(bodies, [b"start %s\n" % tag.encode() + b"".join(lines) for tag in tags])
        # Each left once (the END woke it), taking the last token.
        self.assertEqual(sorted(self.restored), [(tag, 3) for tag in tags])
        self.assertEqual(sorted(ended["sent"] for ended in self.ended(3)), sorted(map(len, bodies)))

    def test_a_member_woken_from_another_thread_leaves_and_goes_on_alone(self):
        tags = ["a", "b"]
        clients, group = self.grouped(tags)
        self.in_hub(group.send, b"one\n", 1)
        # From this thread: resumed, so out of the group first, with the
        # group's token; its own step sends its own data.
        self.app.send("a", b"own\n")
        clients[0].read_until(b"own\n")
        self.assertEqual(self.restored, [("a", 1)])
        self.assertEqual(len(group), 1)
        self.assertTrue(wait_for(lambda: self.state("a") == PARKED))
        self.in_hub(group.send, b"two\n", 2)
        clients[1].read_until(b"two\n")
        bodies = self.end_all(tags, clients)
        self.assertEqual(bodies, [b"start a\none\nown\n", b"start b\none\ntwo\n"])
        self.assertEqual(sorted(ended["sent"] for ended in self.ended(2)), sorted(map(len, bodies)))

    def test_a_member_whose_client_stops_reading_leaves_with_the_rest_queued(self):
        tags = ["a", "b"]
        clients, group = self.grouped(tags)
        clients[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        # b reads everything: with room for a chunk whatever the kernel's
        # tuning (a fresh socket's send buffer starts at 16 KiB), it stays.
        self.parked("b").sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sent = []
        for number in range(1000):
            data = b"%06d" % number + b"g" * 60_000 + b"\n"
            self.in_hub(group.send, data, number + 1)
            sent.append(data)
            clients[1].read_until(data)
            if self.parked("a").group is None:
                break
        # "a" did not take a whole chunk: it left, the rest of that chunk
        # queued (sent on EPOLLOUT), taking that chunk's token.
        self.assertEqual(len(group), 1)
        self.assertEqual(self.restored, [("a", len(sent))])
        self.assertGreater(self.parked("a").queued_bytes, 0)
        self.in_hub(group.send, b"not for a\n", len(sent) + 1)
        clients[1].read_until(b"not for a\n")
        bodies = self.end_all(tags, clients)
        self.assertEqual(bodies[0], b"start a\n" + b"".join(sent))
        self.assertEqual(bodies[1], b"start b\n" + b"".join(sent) + b"not for a\n")

    def test_a_member_whose_client_reset_is_ended_by_the_send(self):
        tags = ["a", "b"]
        clients, group = self.grouped(tags)
        member = self.parked("a")
        server_side = member.sock
        holding, reset_done = threading.Event(), threading.Event()

        def send_once_the_reset_arrived():
            # The hub's thread is held from before the reset: it sees no
            # event of it before the group's send fails on it.
            holding.set()
            self.assertTrue(reset_done.wait(10))
            self.assertTrue(wait_for(lambda: tcp_state(server_side) == TCP_CLOSE))
            group.send(b"after the reset\n", 1)
            # Found by the send, not by the hub's event (not seen yet).
            self.assertTrue(member.broken)

        errors = []

        def send_in_the_hub():
            try:
                self.in_hub(send_once_the_reset_arrived)
            except BaseException as error:  # handed to the test's thread
                errors.append(error)

        sending = threading.Thread(target=send_in_the_hub)
        sending.start()
        self.assertTrue(holding.wait(10))
        clients[0].reset()
        reset_done.set()
        sending.join(10)
        self.assertEqual(errors, [])
        self.assertTrue(wait_for(lambda: self.app.stream("a").cleanups == ["client gone"]))
        self.assertEqual(self.restored, [("a", 1)])
        self.assertEqual(len(group), 1)
        clients[1].read_until(b"after the reset\n")

    def test_a_member_gets_its_heartbeats_and_stays(self):
        clients, group = self.grouped(["a"], "&heartbeat=0.1")
        resumes = self.parked("a").resumes
        for _ in range(3):
            clients[0].read_until(HEARTBEAT)
        self.in_hub(group.send, b"between beats\n", 1)
        clients[0].read_until(b"between beats\n")
        clients[0].read_until(HEARTBEAT)
        self.assertEqual(len(group), 1)
        self.assertEqual(self.parked("a").resumes, resumes)

    def test_shutdown_ends_every_member(self):
        tags = ["a", "b"]
        clients, group = self.grouped(tags)
        self.in_hub(group.send, b"last\n", 1)
        self.assertEqual(self.app.live_streams.shutdown(10), 0)
        self.assertEqual([self.app.stream(tag).cleanups for tag in tags], [["shutdown"]] * 2)
        self.assertEqual(sorted(self.restored), [("a", 1), ("b", 1)])
        self.assertEqual(len(group), 0)

    def test_only_a_stream_parked_in_idle_with_a_wake_step_joins(self):
        self.open_parked("plain")  # its idle() has no wake step
        self.open_parked("refused", "&wakestep=1")
        group = ParkedGroup(0, lambda tag, token: tag != "refused", lambda tag, token: None)
        for tag in ("plain", "refused"):
            guard = self.app.stream(tag).guard
            self.assertFalse(self.in_hub(guard.join_parked_group, group, tag))
        self.assertEqual(len(group), 0)
