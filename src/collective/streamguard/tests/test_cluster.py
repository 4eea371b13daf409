"""Every stream feature on a real cluster: ZEO, two instances, HAProxy.

The layer (``cluster.CLUSTER``) runs runzeo, two runwsgi instances as its
clients and HAProxy with the shipped configuration (``etc/haproxy.cfg.in``,
rendered as `make cluster` renders it).  What must hold through it: parked
log viewers by the thousand never take a page's slot; per-client limits see
the real client, and a forged X-Forwarded-For changes nothing; a ZODB
producer whose final commit conflicts with the other instance ends cleanly;
an instance that stops ends its streams, whose clients come back through
the balancer to the other instance while pages keep answering; a client
that reconnects with Last-Event-ID gets every line of each instance's log
once, whichever instance its reconnects land on.
"""

import json
import os
import resource
import selectors
import socket
import threading
import time
import unittest
import uuid

from collective.streamguard.logs.position import Switch
from collective.streamguard.tests.cluster import ADMIN
from collective.streamguard.tests.cluster import AUTH_HEADER
from collective.streamguard.tests.cluster import CLUSTER
from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import http_request
from collective.streamguard.tests.helpers import reset
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.sse import EventStream

VIEWERS = 1000
#: Descriptors this process keeps for everything but the viewers' sockets.
FDS_KEPT = 200
LOG_STREAM = "/@@stream-log?log=app"
SSE = {"Accept": "text/event-stream"}


def source_address(group, n):
    """A loopback address of its own (127.x.y.z all reach the balancer):
    HAProxy keeps a client's streams on one instance by its address, so
    clients from several addresses spread over the cluster."""
    return f"127.0.{group}.{n + 1}"


class PagePoller(threading.Thread):
    """GETs a page through the balancer in a loop and keeps the statuses."""

    def __init__(self, address, path="/"):
        super().__init__(daemon=True)
        self.address = address
        self.path = path
        self.statuses = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                status, _, _ = http_request(self.address, self.path, timeout=30)
                self.statuses.append(status)
            except OSError as error:
                self.statuses.append(repr(error))


def open_viewers(address, count, sources, deadline=120.0):
    """``count`` SSE viewers of the log ``app``, opened 50 at a time from
    ``sources`` addresses in turn; (viewers that got the stream's first
    event, answers of the others)."""
    opened, failed = [], []
    for start in range(0, count, 50):
        selector = selectors.DefaultSelector()
        pending = {}
        for n in range(start, min(start + 50, count)):
            sock = socket.create_connection(
                address, timeout=30, source_address=(sources[n % len(sources)], 0)
            )
            sock.sendall(
                (
                    f"GET {LOG_STREAM} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Accept: text/event-stream\r\n"
                    f"Authorization: {AUTH_HEADER['Authorization']}\r\n\r\n"
                ).encode()
            )
            sock.setblocking(False)
            pending[sock] = b""
            selector.register(sock, selectors.EVENT_READ)
        end = time.monotonic() + deadline
        while pending and time.monotonic() < end:
            for key, _ in selector.select(1.0):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                pending[sock] += data
                received = pending[sock]
                if b"retry:" in received or not data or not received.startswith(b"HTTP/1.1 200"):
                    selector.unregister(sock)
                    del pending[sock]
                    if received.startswith(b"HTTP/1.1 200") and b"retry:" in received:
                        opened.append(sock)
                    else:
                        failed.append(received[:200])
                        sock.close()
        for sock, received in pending.items():
            failed.append(received[:200] or b"nothing within the deadline")
            sock.close()
        selector.close()
    return opened, failed


def read_all_until(socks, marker, timeout=30.0):
    """The sockets of ``socks`` that received ``marker`` within ``timeout``."""
    selector = selectors.DefaultSelector()
    buffers = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
    got = []
    end = time.monotonic() + timeout
    while buffers and time.monotonic() < end:
        for key, _ in selector.select(1.0):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            buffers[sock] += data
            if marker in buffers[sock] or not data:
                selector.unregister(sock)
                if marker in buffers.pop(sock):
                    got.append(sock)
    selector.close()
    return got


class ClusterTestCase(unittest.TestCase):
    layer = CLUSTER

    def setUp(self):
        if self.layer.skip_reason:
            self.skipTest(self.layer.skip_reason)
        self.addCleanup(self.layer.reset_settings)
        # Registered first, so that it runs after every client closed:
        # each test leaves the instances without streams.
        self.addCleanup(self.assert_no_streams_left)

    def assert_no_streams_left(self):
        for instance in self.layer.instances:
            if instance.running:
                self.assertTrue(
                    wait_for(lambda: not instance.status()["live"], 30),  # noqa: B023
                    f"{instance.name}: {instance.status()['live'][:5]}",
                )

    def client(self, source, address=None):
        client = HTTPClient(address or self.layer.balancer, timeout=30, source=source)
        # With a reset: HAProxy passes a client's FIN on to the instance
        # only at the stream's next write (README: Deployment).
        self.addCleanup(client.reset)
        return client

    def live_clients(self):
        """The client addresses of the live streams, on every instance."""
        return sorted(
            stream["client"]
            for instance in self.layer.instances
            for stream in instance.status()["live"]
        )

    def instance_of(self, client_address):
        """The instance that serves a stream of ``client_address``."""
        for instance in self.layer.instances:
            if any(s["client"] == client_address for s in instance.status()["live"]):
                return instance
        return None


class TestParkedViewersAndPages(ClusterTestCase):
    def test_1000_parked_viewers_over_the_cluster_and_pages_answer(self):
        # Each viewer holds a socket here (and two in HAProxy, one in an
        # instance): as many as this process' open-files limit allows.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        count = min(VIEWERS, hard - FDS_KEPT)
        if count < VIEWERS:
            print(f"\n  open-files limit {hard}: {count} viewers instead of {VIEWERS}")
        sources = [source_address(1, n) for n in range(20)]
        poller = PagePoller(self.layer.balancer)
        poller.start()
        self.addCleanup(poller.join, 35)
        self.addCleanup(poller.stop.set)

        viewers, failed = open_viewers(self.layer.balancer, count, sources)
        self.addCleanup(lambda: [reset(sock) for sock in viewers])
        self.assertEqual(failed, [])
        self.assertEqual(len(viewers), count)
        # All parked (no thread held), spread over both instances.
        self.assertTrue(
            wait_for(lambda: sum(i.status()["parked"] for i in self.layer.instances) == count, 60),
            [{k: v for k, v in i.status().items() if k != "live"} for i in self.layer.instances],
        )
        parked = {i.name: i.status()["parked"] for i in self.layer.instances}
        self.assertTrue(all(parked.values()), parked)
        # Sticky: all viewers of one client address are on one instance.
        first, second = ({s["client"] for s in i.status()["live"]} for i in self.layer.instances)
        self.assertEqual(first & second, set())
        self.assertEqual(first | second, set(sources))
        # Pages through the balancer, with every viewer parked: each of
        # the instances' 4 threads is free for them.
        pages = [http_request(self.layer.balancer, "/", timeout=30)[0] for _ in range(40)]
        self.assertEqual(set(pages), {200})
        poller.stop.set()
        poller.join(35)
        self.assertTrue(poller.statuses)
        self.assertEqual(set(poller.statuses), {200}, poller.statuses[:20])
        # And the viewers are live: a line appended to each instance's log
        # reaches every viewer (each sees its own instance's line).
        marker = f"cluster line {uuid.uuid4().hex}".encode()
        for instance in self.layer.instances:
            with open(instance.app_log, "ab") as f:
                f.write(marker + b"\n")
        self.assertEqual(len(read_all_until(viewers, marker)), count)


class TestRouting(ClusterTestCase):
    def test_pages_take_turns_and_the_add_on_pages_named_stream_are_pages(self):
        # @@stream-status is a page (the streams backend is for streams):
        # one client's requests go to each instance in turn.
        names = []
        for _ in range(4):
            status, _, body = http_request(
                self.layer.balancer, "/@@stream-status?format=json", auth=("admin", "admin")
            )
            self.assertEqual(status, 200, body)
            names.append(json.loads(body)["instance"])
        self.assertEqual(sorted(set(names)), ["instance1", "instance2"], names)


class TestClientsBehindTheBalancer(ClusterTestCase):
    def setUp(self):
        super().setUp()
        for instance in self.layer.instances:
            instance.configure(max_streams_per_user=1)

    def stream(self, source, address=None, forwarded_for=None):
        """An anonymous event stream from ``source``; (client, tag)."""
        tag = f"t{uuid.uuid4().hex[:12]}"
        headers = dict(SSE)
        if forwarded_for:
            headers["X-Forwarded-For"] = forwarded_for
        client = self.client(source, address)
        client.request(
            f"/@@streamguard-test-stream?tag={tag}&mode=heartbeat&type=text/event-stream",
            headers=headers,
        )
        return client, tag

    def opened(self, client, tag):
        self.assertEqual(client.head()[0], 200)
        client.read_until(f"first line of {tag}".encode())

    def test_anonymous_clients_behind_the_balancer_have_their_own_limits(self):
        # Three clients, two instances: two of them (at least) share one.
        sources = [source_address(2, n) for n in range(3)]
        for source in sources:
            self.opened(*self.stream(source))
        # Each is counted as itself (not as the balancer, 127.0.0.1)...
        self.assertEqual(self.live_clients(), sources)
        self.assertGreaterEqual(max(len(i.status()["live"]) for i in self.layer.instances), 2)
        # ... so one client's second stream is over its own limit (1),
        # on the instance its streams stick to.
        again, _ = self.stream(sources[0])
        self.assertEqual(again.head()[0], 429)

    def test_a_forged_forwarded_for_changes_nothing(self):
        # Through the balancer: HAProxy adds the real address after the
        # forged one, and the instance takes the last.
        source = source_address(3, 0)
        self.opened(*self.stream(source, forwarded_for="198.51.100.7"))
        self.assertEqual(self.live_clients(), [source])
        again, _ = self.stream(source, forwarded_for="198.51.100.8")
        self.assertEqual(again.head()[0], 429)
        # Straight to an instance from an address that is not the
        # balancer: the header is not trusted at all.
        direct = source_address(3, 1)
        instance = self.layer.instances[0]
        address = (HOST, instance.port)
        self.opened(*self.stream(direct, address, forwarded_for="198.51.100.9"))
        self.assertEqual(self.live_clients(), sorted([source, direct]))
        again, _ = self.stream(direct, address, forwarded_for="198.51.100.10")
        self.assertEqual(again.head()[0], 429)


class TestConflictAcrossInstances(ClusterTestCase):
    def mark(self, instance):
        status, _, body = http_request(
            (HOST, instance.port), "/@@streamguard-test-mark", timeout=30
        )
        self.assertEqual(status, 200, body)
        return body.decode()

    def test_a_final_commit_that_conflicts_with_the_other_instance_ends_cleanly(self):
        tag = f"conflict-{uuid.uuid4().hex[:12]}"
        client = self.client(source_address(4, 0))
        client.request(f"/@@streamguard-cluster-write?tag={tag}", headers=SSE)
        self.assertEqual(client.head()[0], 200)
        client.read_until(b"data: marked\n\n")
        (producing,) = [i for i in self.layer.instances if i.events("start", tag=tag)]
        (other,) = [i for i in self.layer.instances if i is not producing]
        # The other instance changes the same object and commits first.
        status, _, body = http_request(
            (HOST, other.port), "/@@streamguard-cluster-mark?value=theirs", timeout=30
        )
        self.assertEqual(status, 200, body)
        self.layer.open_gate(tag)
        # The producer finished; its final commit conflicts: the client is
        # told in the stream's format, and the body has no clean end.
        client.read_until(b"event: error\n")
        self.assertTrue(client.closed())
        with self.assertRaisesRegex(AssertionError, "server closed before the body ended"):
            client.body()
        self.assertTrue(wait_for(lambda: producing.events("cleanup", tag=tag)))
        self.assertEqual([e["reason"] for e in producing.events("cleanup", tag=tag)], ["error"])
        log = producing.stream_log_text()
        self.assertIn("ConflictError", log)
        self.assertRegex(log, r"stream \d+ ended \(error\)")
        # Nothing of the producer was committed, on either instance.
        for instance in self.layer.instances:
            self.assertTrue(wait_for(lambda: self.mark(instance) == "theirs"))  # noqa: B023


class TestAnInstanceStops(ClusterTestCase):
    def test_sigterm_ends_its_viewers_who_come_back_through_the_balancer(self):
        sources = [source_address(5, n) for n in range(8)]
        viewers = {}
        for source in sources:
            client = self.client(source)
            client.request(LOG_STREAM, headers={**SSE, **AUTH_HEADER})
            self.assertEqual(client.head()[0], 200)
            client.read_until(b"retry:")
            viewers[source] = client
        self.assertTrue(
            wait_for(lambda: sum(i.status()["parked"] for i in self.layer.instances) == 8)
        )
        placed = {source: self.instance_of(source) for source in sources}
        stopping = max(self.layer.instances, key=lambda i: list(placed.values()).count(i))
        (staying,) = [i for i in self.layer.instances if i is not stopping]
        leaving = [source for source in sources if placed[source] is stopping]
        self.assertTrue(leaving)
        poller = PagePoller(self.layer.balancer)
        poller.start()
        self.addCleanup(poller.join, 35)
        self.addCleanup(poller.stop.set)
        self.addCleanup(lambda: stopping.running or self.layer.restart(stopping))
        self.assertTrue(wait_for(lambda: len(poller.statuses) >= 5))
        shutdowns = stopping.stream_log_text().count("ended (shutdown)")

        self.assertIsNotNone(stopping.stop())
        # Its viewers' streams ended, cleanly (body() raises on a body
        # without its end), each logged as a shutdown.
        for source in leaving:
            viewers[source].body()
            self.assertTrue(viewers[source].closed())
        self.assertEqual(
            stopping.stream_log_text().count("ended (shutdown)") - shutdowns, len(leaving)
        )
        # They reconnect through the balancer and reach the other instance.
        back = {}
        for source in leaving:
            client = self.client(source)
            client.request(LOG_STREAM, headers={**SSE, **AUTH_HEADER})
            self.assertEqual(client.head()[0], 200)
            client.read_until(b"retry:")
            back[source] = client
        self.assertTrue(wait_for(lambda: staying.status()["parked"] == len(sources)))
        self.assertEqual(sorted(s["client"] for s in staying.status()["live"]), sorted(sources))
        marker = f"after the stop {uuid.uuid4().hex}".encode()
        with open(staying.app_log, "ab") as f:
            f.write(marker + b"\n")
        for client in back.values():
            client.read_until(marker)
        # Pages answered all the while.
        poller.stop.set()
        poller.join(35)
        self.assertEqual(set(poller.statuses), {200}, poller.statuses[:20])


class TestResumeAcrossInstances(ClusterTestCase):
    """Reconnects with ``Last-Event-ID``, as an EventSource makes them: each
    instance follows its own ``app.log`` under the one name ``app``."""

    def events(self, address, last_event_id=None, source=None):
        """An ``EventStream`` of the log ``app`` (its last 2 lines first, on
        a new start); its start event read."""
        stream = EventStream.open(
            address,
            f"{LOG_STREAM}&format=sse&lines=2",
            auth=ADMIN,
            last_event_id=last_event_id,
            source=source,
        )
        # With a reset: through HAProxy a FIN reaches the instance late.
        self.addCleanup(lambda: stream.client.sock.fileno() < 0 or stream.client.reset())
        self.assertEqual(stream.status, 200)
        stream.start = stream.next()
        return stream

    def append(self, instance, text):
        with open(instance.app_log, "a", encoding="utf-8") as f:
            f.write(text)

    def read_to_the_end(self, stream, instance):
        """The data of the message events until the stream's place is the
        end of ``instance``'s file."""
        size = os.path.getsize(instance.app_log)
        received = []
        while stream.offset != size:
            event = stream.next()
            self.assertIsNotNone(event, "the stream ended")
            self.assertEqual(event.type, "message", event)
            received.append(event.data)
        return "".join(received)

    def last_two_lines_start(self, instance):
        """The byte offset of the last 2 lines of ``instance``'s file, where
        a stream with ``lines=2`` starts."""
        with open(instance.app_log, "rb") as f:
            content = f.read()
        return len(content) - len(b"".join(content.splitlines(keepends=True)[-2:]))

    def assert_each_line_once(self, received, starts):
        for instance, texts in received.items():
            with open(instance.app_log, "rb") as f:
                f.seek(starts[instance])
                self.assertEqual("".join(texts), f.read().decode("utf-8"), instance.name)

    def test_round_robin_reconnects_get_every_line_of_each_file_once(self):
        # Straight to the instances in turn: a balancer without stickiness.
        tag = uuid.uuid4().hex[:12]
        instances = self.layer.instances
        for instance in instances:
            self.append(instance, f"{tag} first in {instance.name}\n{tag} second\n")
        received = {instance: [] for instance in instances}
        starts = {}
        half = {instance: False for instance in instances}  # a line not ended
        last_event_id = None
        rounds = 9
        for round in range(rounds):
            here = instances[round % 2]
            if here not in starts:
                starts[here] = self.last_two_lines_start(here)
            stream = self.events((HOST, here.port), last_event_id)
            about = stream.start.json()
            self.assertEqual((about["instance"], about["log"]), (here.name, "app"), about)
            if round == 0:
                self.assertEqual(stream.start.type, "stream", about)
            elif round == 1:  # the first time on the other instance's file
                self.assertEqual(stream.start.type, "switch", about)
                self.assertEqual(
                    (about["reason"], about["start"], about["lines"]),
                    (Switch.OTHER_FILE, "lines", 2),
                )
            else:  # back on a file it was on: where it left it
                self.assertEqual(stream.start.type, "switch", about)
                self.assertEqual((about["reason"], about["start"]), (Switch.RETURNED, "resumed"))
            if round < rounds - 1:
                # Lines in both files, the other's written while the
                # client is not there.
                for instance in instances:
                    rest = "the rest\n" if half[instance] else ""
                    half[instance] = False
                    self.append(instance, f"{rest}{tag} round {round} in {instance.name}\n")
                if round in (2, 4, 5):
                    # Half a line, read now; its rest comes while the
                    # client is on the other instance.
                    self.append(here, f"{tag} half of round {round}, ")
                    half[here] = True
            received[here].append(self.read_to_the_end(stream, here))
            last_event_id = stream.last_event_id
            stream.client.reset()
        self.assert_each_line_once(received, starts)
        self.assertFalse(any(half.values()))

    def test_sticky_reconnects_through_the_balancer_resume_exactly(self):
        # A heartbeat every second: HAProxy passes a client's reset on to
        # the instance only at the stream's next write, so the streams left
        # here end within a second (assert_no_streams_left), not 15 s.
        for instance in self.layer.instances:
            instance.configure(heartbeat_interval=1)
        tag = uuid.uuid4().hex[:12]
        source = source_address(6, 0)
        for instance in self.layer.instances:
            self.append(instance, f"{tag} first in {instance.name}\n{tag} second\n")
        stream = self.events(self.layer.balancer, source=source)
        self.assertEqual(stream.start.type, "stream", stream.start)
        name = stream.start.json()["instance"]
        (here,) = [i for i in self.layer.instances if i.name == name]
        received = []
        starts = {here: self.last_two_lines_start(here)}
        for round in range(6):
            for instance in self.layer.instances:
                self.append(instance, f"{tag} round {round} in {instance.name}\n")
            if round % 2:
                self.append(here, f"{tag} half of round {round}, ")
            received.append(self.read_to_the_end(stream, here))
            if round % 2:
                self.append(here, "the rest\n")
            stream.client.reset()
            stream = self.events(self.layer.balancer, stream.last_event_id, source=source)
            # The same instance, the same file: no switch.
            self.assertEqual(stream.start.type, "stream", stream.start)
            self.assertEqual(stream.start.json(), {"instance": name, "log": "app"})
        received.append(self.read_to_the_end(stream, here))
        self.assert_each_line_once({here: received}, starts)
