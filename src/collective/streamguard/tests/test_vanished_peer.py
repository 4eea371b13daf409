"""A client that vanishes without FIN or reset is found by TCP keepalive.

A real waitress in this process listens on one end of a veth pair; the
client runs in a network namespace of its own (``ip netns``, as root) at
the other end.  Taking the client's link down is a laptop that sleeps or a
dropped network: no FIN, no reset, no packet ever again.  The stream is
idle (it sends nothing), so only the kernel's keepalive probes, which the
guard turns on for every stream socket, can find that the peer is gone.
The probes are made faster for the test; the defaults are checked on a
socket of a normal stream.
"""

import os
import socket
import subprocess
import sys
import time
import unittest
from unittest import mock

from webtest.http import StopableWSGIServer

from collective.streamguard import connection as connection_module
from collective.streamguard.connection import client_connection
from collective.streamguard.guard import GuardedStream
from collective.streamguard.guard import StreamGuard
from collective.streamguard.streams import LiveStreams
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.waitress.output import DirectOutput

CLIENT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sock.sendall(b"GET / HTTP/1.1\\r\\nHost: test\\r\\n\\r\\n")
data = b""
while b"\\r\\n\\r\\n" not in data:
    data += sock.recv(4096)
print("headers", flush=True)
sys.stdin.read()  # hold the socket until the test is done
"""


def run(*command):
    subprocess.run(command, check=True, capture_output=True, timeout=30)


class IdleStreamApp:
    """A stream that only waits: nothing is ever written to its client but,
    with ``heartbeat_interval`` (seconds), a heartbeat as server-sent events
    have (``GuardedStream`` then shortens the user timeout, as for them)."""

    def __init__(self, heartbeat_interval=None):
        self.heartbeat_interval = heartbeat_interval
        self.live_streams = LiveStreams()
        self.ended = []
        self.options = []
        self.beats = []  # time.monotonic() of each heartbeat yielded

    def __call__(self, environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        connection = client_connection(environ)
        guard = StreamGuard(
            connection,
            heartbeat=b": keep-alive\n\n",
            heartbeat_interval=self.heartbeat_interval,
            live_streams=self.live_streams,
        )
        guard.add_cleanup(lambda: self.ended.append(guard.reason.value))

        def producer():
            sock = socket.socket(fileno=os.dup(connection.fileno()))
            with sock:
                self.options.append(
                    (
                        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                    )
                )
            if self.heartbeat_interval:
                # The heartbeats are yielded by idle(): the stream's writes.
                while not (yield from self.beating(guard)):
                    pass
            else:
                while not guard.wait(60):
                    pass
            yield b""

        return GuardedStream(producer(), guard, direct_output=DirectOutput.for_caller)

    def beating(self, guard):
        """``guard.idle(60)``, keeping the time of every heartbeat it yields
        in ``beats`` (the benchmark tells the write after the vanish from
        the timeout after it)."""
        waiting = guard.idle(60)
        try:
            chunk = next(waiting)
            while True:
                self.beats.append(time.monotonic())
                chunk = waiting.send((yield chunk))
        except StopIteration as done:
            return done.value


class ClientNamespaceLayer:
    """A network namespace for the client and a veth pair to it (as root)."""

    __bases__ = ()
    __name__ = "ClientNamespaceLayer"
    __module__ = __name__

    @classmethod
    def setUp(cls):
        pid = os.getpid()
        cls.namespace = f"sgtest{pid}"
        cls.host_if, cls.client_if = f"sgh{pid % 100000}", f"sgc{pid % 100000}"
        net = f"10.{200 + (pid // 250) % 50}.{pid % 250}"
        cls.server_ip, cls.client_ip = f"{net}.1", f"{net}.2"
        run("ip", "netns", "add", cls.namespace)
        run("ip", "link", "add", cls.host_if, "type", "veth", "peer", "name", cls.client_if)
        run("ip", "link", "set", cls.client_if, "netns", cls.namespace)
        run("ip", "addr", "add", f"{cls.server_ip}/30", "dev", cls.host_if)
        run("ip", "link", "set", cls.host_if, "up")
        run(*cls.in_ns(), "ip", "addr", "add", f"{cls.client_ip}/30", "dev", cls.client_if)

    @classmethod
    def in_ns(cls):
        return ("ip", "netns", "exec", cls.namespace)

    @classmethod
    def client_link(cls, state):
        """Set the client's end of the pair ``up`` or ``down``; for ``up``,
        wait until both ends have their carrier (the kernel brings a veth up
        asynchronously: a connect before that is "network unreachable")."""
        run(*cls.in_ns(), "ip", "link", "set", cls.client_if, state)
        if state == "up":

            def carrier():
                host = subprocess.run(
                    ["ip", "-br", "link", "show", "dev", cls.host_if],
                    capture_output=True,
                    text=True,
                ).stdout
                client = subprocess.run(
                    [*cls.in_ns(), "ip", "-br", "link", "show", "dev", cls.client_if],
                    capture_output=True,
                    text=True,
                ).stdout
                return "LOWER_UP" in host and "LOWER_UP" in client

            assert wait_for(carrier, timeout=30), "the veth pair did not come up"

    @classmethod
    def tearDown(cls):
        # Deleting the namespace deletes its veth end, and with it the pair.
        subprocess.run(["ip", "netns", "del", cls.namespace], timeout=30)
        subprocess.run(["ip", "link", "del", cls.host_if], capture_output=True, timeout=30)


class TestVanishedPeer(unittest.TestCase):
    layer = ClientNamespaceLayer

    #: The stream's heartbeat (seconds), None for a stream that only waits.
    heartbeat_interval = None

    def setUp(self):
        self.layer.client_link("up")
        self.app = IdleStreamApp(self.heartbeat_interval)
        server = StopableWSGIServer.create(self.app, host=self.layer.server_ip, threads=2)
        self.addCleanup(server.runner.join, 10)
        self.addCleanup(server.shutdown)
        self.assertTrue(server.wait())
        self.port = server.adj.port

    def start_client(self):
        client = subprocess.Popen(
            ["ip", "netns", "exec", self.layer.namespace, sys.executable, "-c", CLIENT]
            + [self.layer.server_ip, str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(client.wait, 10)
        self.addCleanup(client.kill)
        self.assertEqual(client.stdout.readline().strip(), "headers")
        return client

    def test_every_stream_socket_gets_keepalive_within_a_minute(self):
        self.start_client()
        self.assertTrue(wait_for(lambda: self.app.options))
        self.assertEqual(self.app.options[0], (1, 20, 10, 3, 50_000))

    def test_an_idle_stream_whose_client_vanished_ends_as_client_gone(self):
        fast = {
            "KEEPALIVE_IDLE": 1,
            "KEEPALIVE_INTERVAL": 1,
            "KEEPALIVE_COUNT": 2,
            "USER_TIMEOUT_MS": 3000,
        }
        with mock.patch.multiple(connection_module, **fast):
            self.start_client()
            self.assertTrue(wait_for(lambda: self.app.options))
        # The client's network goes away: no FIN, no reset.
        self.layer.client_link("down")
        self.assertTrue(wait_for(lambda: self.app.ended, timeout=60), "the stream did not end")
        self.assertEqual(self.app.ended, ["client gone"])


class TestVanishedPeerOfAHeartbeatStream(TestVanishedPeer):
    """A stream that sends a heartbeat every 15 s, as server-sent events do
    by default: its unacknowledged heartbeat, not a keepalive probe, finds
    the peer gone (after the shortened user timeout: about 50 s in all,
    ``benchmarks/bench_vanished_peer.py --heartbeat 15`` measures it).  The
    real settings, nothing made faster: one wait of about a minute."""

    heartbeat_interval = 15

    def test_every_stream_socket_gets_keepalive_within_a_minute(self):
        self.start_client()
        self.assertTrue(wait_for(lambda: self.app.options))
        # The user timeout leaves room for the heartbeat before it.
        self.assertEqual(self.app.options[0], (1, 20, 10, 3, 35_000))

    def test_an_idle_stream_whose_client_vanished_ends_as_client_gone(self):
        self.start_client()
        self.assertTrue(wait_for(lambda: self.app.options))
        self.layer.client_link("down")
        self.assertTrue(wait_for(lambda: self.app.ended, timeout=180), "the stream did not end")
        self.assertEqual(self.app.ended, ["client gone"])
