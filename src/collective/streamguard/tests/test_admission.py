"""waitress' queue and I/O loop under a burst of stream openings.

``PagesFirstQueue`` orders real waitress requests (parsed by waitress' own
parser from the bytes a browser sends); the ``ParkingChannel`` checks run
on a real waitress server and channel over a real socket pair, whose loop
is not started: the test plays the I/O thread.
"""

import logging
import select
import socket
import threading
import unittest

from waitress.parser import HTTPRequestParser
from waitress.server import create_server
from waitress.task import ThreadedTaskDispatcher

from collective.streamguard.waitress import admission
from collective.streamguard.waitress.park import ParkingChannel
from collective.streamguard.waitress.park import QueueWarningsPerSecond


def app(environ, start_response):  # never called: no loop runs
    start_response("200 OK", [])
    return [b""]


class Waiting:
    """What waitress queues for a request: a channel whose first request
    waits (only ``requests`` is read by the queue)."""

    def __init__(self, server, raw):
        parser = HTTPRequestParser(server.adj)
        parser.received(raw)
        self.requests = [parser]
        self.name = getattr(parser, "path", "?")

    def __repr__(self):
        return self.name


def request(path, accept="text/html"):
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n".encode()


class ServerTestCase(unittest.TestCase):
    def setUp(self):
        # No worker threads: nothing here is served.
        self.server = create_server(
            app, host="127.0.0.1", port=0, _dispatcher=ThreadedTaskDispatcher()
        )
        self.addCleanup(self.server.close)


class TestStreamRequests(unittest.TestCase):
    def test_what_opens_a_stream(self):
        opens = admission.is_stream_request
        self.assertTrue(opens("/Plone/@@stream-log", ""))
        self.assertTrue(opens("/Plone/stream-log", ""))
        self.assertTrue(opens("/Plone/folder/@@stream-export", ""))
        self.assertTrue(opens("/Plone/@@anything", "text/event-stream"))
        self.assertTrue(opens("/Plone/@@anything", "text/html, text/event-stream;q=0.5"))
        self.assertFalse(opens("/Plone/@@stream-status", "text/html"))
        self.assertFalse(opens("/Plone/@@stream-log-viewer", "text/html"))
        self.assertFalse(opens("/Plone/@@export-stream", "text/html"))
        self.assertFalse(opens("/Plone/front-page", "*/*"))
        self.assertFalse(opens("/", ""))


class TestPagesFirstQueue(ServerTestCase):
    def test_pages_and_openings_take_turns_and_keep_their_order(self):
        queue = admission.PagesFirstQueue()
        for n in range(4):
            queue.append(Waiting(self.server, request(f"/s{n}/@@stream-log")))
        queue.append(Waiting(self.server, request("/p0")))
        queue.append(Waiting(self.server, request("/e0", accept="text/event-stream")))
        queue.append(Waiting(self.server, request("/p1")))
        self.assertEqual((len(queue), queue.waiting_openings), (7, 5))
        order = [queue.popleft().name for _ in range(7)]
        self.assertEqual(
            order,
            ["/p0", "/s0/@@stream-log", "/p1", "/s1/@@stream-log"]
            + ["/s2/@@stream-log", "/s3/@@stream-log", "/e0"],
        )
        self.assertFalse(queue)
        with self.assertRaises(IndexError):
            queue.popleft()

    def test_anything_but_a_waiting_request_keeps_waitress_order(self):
        queue = admission.PagesFirstQueue()
        runner = object()  # a parked stream's step: no requests
        broken = Waiting(self.server, b"GARBAGE\r\n\r\n")
        queue.append(runner)
        queue.append(broken)
        self.assertIsNotNone(broken.requests[0].error)
        self.assertEqual([queue.popleft(), queue.popleft()], [runner, broken])

    def test_installed_on_a_dispatcher_it_keeps_what_waits(self):
        dispatcher = ThreadedTaskDispatcher()
        page = Waiting(self.server, request("/p"))
        dispatcher.queue.append(page)
        queue = admission.install(dispatcher)
        self.assertIs(dispatcher.queue, queue)
        self.assertIs(admission.install(dispatcher), queue)
        dispatcher.add_task(Waiting(self.server, request("/@@stream-log")))
        self.assertEqual(len(dispatcher.queue), 2)
        self.assertIs(dispatcher.queue.popleft(), page)


class TestNoSpinWhileAWorkerSends(ServerTestCase):
    """waitress' loop polls a channel for writing while it has output; when
    a worker holds the output lock the loop cannot flush, and poll() would
    return at once, again and again (the spin of issue 18)."""

    def setUp(self):
        super().setUp()
        ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.channel = ParkingChannel(self.server, ours, ("127.0.0.1", 1), self.server.adj)
        self.addCleanup(self.channel.close)
        self.channel.requests = [HTTPRequestParser(self.server.adj)]
        self.drain_trigger()

    def drain_trigger(self):
        while select.select([self.server.trigger.socket], [], [], 0)[0]:
            self.server.trigger.handle_read()

    def trigger_pulled(self):
        return bool(select.select([self.server.trigger.socket], [], [], 0)[0])

    def lock_is_free(self):
        """Whether another thread (the I/O thread) could take the output
        lock now."""
        free = []

        def look():
            free.append(self.channel.outbuf_lock.acquire(False))
            if free[0]:
                self.channel.outbuf_lock.release()

        thread = threading.Thread(target=look)
        thread.start()
        thread.join(10)
        return free[0]

    def test_not_writable_while_a_worker_holds_the_output_lock(self):
        holding, release = threading.Event(), threading.Event()

        def worker():
            with self.channel.outbuf_lock:
                self.channel.outbufs[-1].append(b"queued")
                self.channel.total_outbufs_len += 6
                holding.set()
                release.wait(10)

        thread = threading.Thread(target=worker)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(release.set)
        self.assertTrue(holding.wait(10))
        self.assertFalse(self.channel.writable())
        release.set()
        thread.join(10)
        self.assertTrue(self.channel.writable())

    def test_a_refused_wake_is_given_again_when_the_worker_lets_go(self):
        entered, go_on = threading.Event(), threading.Event()
        send = self.channel.send

        def slow_send(data, do_close=True):
            # Inside write_soon(), with the lock held: the loop looks now.
            entered.set()
            go_on.wait(10)
            return 0  # the socket took nothing: the data stays queued

        self.channel.send = slow_send
        self.addCleanup(setattr, self.channel, "send", send)
        thread = threading.Thread(target=self.channel.write_soon, args=(b"headers",))
        thread.start()
        self.addCleanup(thread.join, 10)
        self.addCleanup(go_on.set)
        pulls = []  # for each wake: could the loop have flushed then?
        pull_trigger = self.server.pull_trigger
        self.server.pull_trigger = lambda: (pulls.append(self.lock_is_free()), pull_trigger())
        self.addCleanup(setattr, self.server, "pull_trigger", pull_trigger)
        self.assertTrue(entered.wait(10))
        self.assertFalse(self.channel.writable())  # the wake is refused
        go_on.set()
        thread.join(10)
        # waitress wakes the loop inside the lock, where writable() says
        # False again; the wake that counts comes after.
        self.assertEqual(pulls, [False, True])
        self.assertTrue(self.channel.writable())

    def test_no_extra_wake_when_nothing_was_refused(self):
        self.channel.write_soon(b"headers")  # sent at once by the socket pair
        self.assertEqual(self.peer.recv(100), b"headers")
        self.assertEqual(self.channel.total_outbufs_len, 0)
        self.assertFalse(self.trigger_pulled())


class TestWaitingChannelsWaitOutOfTheMap(ServerTestCase):
    """waitress' loop asks every channel of its map, at every pass, whether
    it is readable and writable; a channel whose request waits for a
    worker waits out of the map (``admission.WaitingRoom``) until a worker
    takes it."""

    def setUp(self):
        super().setUp()
        self.room = admission.WaitingRoom.install(self.server)  # the test is the I/O thread
        ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.channel = ParkingChannel(
            self.server, ours, ("127.0.0.1", 1), self.server.adj, map=self.server._map
        )
        self.addCleanup(self.channel.close)
        self.fileno = ours.fileno()

    def in_map(self):
        return self.server._map.get(self.fileno) is self.channel

    def in_room(self):
        return self.room.channels.get(self.fileno) is self.channel

    def queue_request(self):
        self.peer.sendall(request("/@@stream-log?log=event"))
        self.channel.handle_read()  # the loop's read: the request is queued
        self.assertEqual(len(self.channel.requests), 1)

    def test_a_request_waiting_for_a_worker_is_out_of_the_map_until_a_worker_takes_it(self):
        self.assertTrue(self.in_map())  # idle: it reads
        self.queue_request()
        self.assertFalse(self.in_map())
        self.assertTrue(self.in_room())
        self.assertEqual(len(self.room), 1)
        seen_by_app = []
        self.channel.server.application = lambda environ, start_response: (
            seen_by_app.append((self.in_map(), self.in_room())),
            start_response("200 OK", [("Content-Length", "2")]),
            [b"ok"],
        )[2]
        self.channel.service()  # a worker takes it
        self.assertEqual(seen_by_app, [(True, False)])  # back before the request ran
        self.assertEqual(self.peer.recv(100).split(b"\r\n")[0], b"HTTP/1.1 200 OK")
        self.assertTrue(self.in_map())
        self.assertEqual(len(self.room), 0)

    def test_a_channel_with_output_to_send_stays_in_the_map(self):
        self.channel.write_soon(b"x" * (8 << 20))  # more than the socket pair takes
        self.assertTrue(self.channel.total_outbufs_len)
        self.queue_request()
        self.assertTrue(self.in_map())
        self.assertFalse(self.in_room())
        self.assertTrue(self.channel.writable())

    def test_the_connection_limit_counts_the_waiting_channels(self):
        self.queue_request()
        # waitress alone counts the map: one connection left below the limit.
        self.server.adj.connection_limit = len(self.server._map) + 1
        with self.assertLogs("collective.streamguard", "WARNING") as logged:
            self.assertFalse(self.server.readable())
        self.assertIn("connection limit (1 waiting for a worker)", logged.output[0])
        self.server.adj.connection_limit += 1
        with self.assertLogs("collective.streamguard", "INFO") as logged:
            self.assertTrue(self.server.readable())
        self.assertIn("listening again", logged.output[0])

    def test_shutdown_closes_the_channels_that_wait_out_of_the_map(self):
        self.queue_request()
        self.assertTrue(self.in_room())
        # waitress' shutdown cancels what waits in its queue (no thread runs
        # here); the channel, out of the map, is not among the map's.
        self.assertTrue(self.server.task_dispatcher.shutdown(timeout=0))
        self.assertFalse(self.in_room())
        self.assertFalse(self.in_map())
        self.assertEqual(self.peer.recv(100), b"")  # closed
        self.assertFalse(self.channel.connected)

    def test_servers_that_share_a_map_share_its_room(self):
        multi = create_server(
            app, listen="127.0.0.1:0 127.0.0.1:0", _dispatcher=ThreadedTaskDispatcher()
        )
        self.addCleanup(multi.close)
        listeners = [d for d in multi.map.values() if hasattr(d, "accepting") and d.accepting]
        self.assertEqual(len(listeners), 2)
        rooms = [admission.WaitingRoom.install(server) for server in listeners]
        self.assertIs(rooms[0], rooms[1])
        self.assertIs(rooms[0].map, multi.map)
        self.assertIs(admission.WaitingRoom.install(listeners[0]), rooms[0])  # once


class TestAcceptInBatches(ServerTestCase):
    """A page's new connection waits in the kernel's backlog behind every
    connection that came before it; waitress takes one per wake of its
    loop, the add-on all of them, up to its listen backlog (the test is
    the I/O thread)."""

    def connect(self, count):
        clients = []
        for _ in range(count):
            client = socket.create_connection(self.server.socket.getsockname())
            self.addCleanup(client.close)
            clients.append(client)
        return clients

    def accept_once(self):
        before = set(self.server.active_channels)
        self.server.handle_accept()
        accepted = [
            self.server.active_channels[fd] for fd in set(self.server.active_channels) - before
        ]
        for channel in accepted:
            self.addCleanup(channel.close)
        return accepted

    def test_waitress_alone_accepts_one_connection_per_wake(self):
        self.connect(5)
        self.assertEqual(len(self.accept_once()), 1)

    def test_waiting_connections_are_accepted_together(self):
        admission.accept_in_batches(self.server)
        admission.accept_in_batches(self.server)  # once
        self.connect(5)
        self.assertEqual(len(self.accept_once()), 5)
        self.assertEqual(self.accept_once(), [])  # nothing left: no wait

    def test_more_than_32_are_accepted_in_one_wake(self):
        # 32 per wake left a page's connection 0.9 s in the backlog.
        admission.accept_in_batches(self.server)
        self.connect(40)
        self.assertEqual(len(self.accept_once()), 40)

    def test_a_batch_is_at_most_the_listen_backlog(self):
        admission.accept_in_batches(self.server)
        self.server.adj.backlog = 4
        self.connect(5)
        self.assertEqual(len(self.accept_once()), 4)
        self.assertEqual(len(self.accept_once()), 1)

    def test_a_batch_stops_at_the_connection_limit(self):
        admission.WaitingRoom.install(self.server)
        admission.accept_in_batches(self.server)
        self.server.adj.connection_limit = len(self.server._map) + 3
        self.connect(5)
        with self.assertLogs("waitress", "WARNING"):  # waitress' own limit
            self.assertEqual(len(self.accept_once()), 3)
            self.assertFalse(self.server.readable())
        self.server.adj.connection_limit += 2
        self.assertEqual(len(self.accept_once()), 2)


class Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class TestQueueWarnings(unittest.TestCase):
    def test_one_queue_warning_a_second_with_the_count_left_out(self):
        now = [100.0]
        warnings = QueueWarningsPerSecond(clock=lambda: now[0])
        logger = logging.getLogger("collective.streamguard.tests.queue")
        logger.propagate = False
        logger.addFilter(warnings)
        handler = Messages()
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(logger.removeFilter, warnings)
        for depth in range(1, 101):
            logger.warning("Task queue depth is %d", depth)
        now[0] += 1.0
        logger.warning("Task queue depth is %d", 101)
        self.assertEqual(
            handler.messages,
            ["Task queue depth is 1", "Task queue depth is 101 (99 more such warnings left out)"],
        )

    def test_waitress_queue_logger_has_it(self):
        filters = logging.getLogger("waitress.queue").filters
        self.assertTrue(any(isinstance(f, QueueWarningsPerSecond) for f in filters))
