"""A stand-in for classic ZServer's HTTP server, on real asyncore sockets.

ZServer itself only runs on Python 2.7, which cannot be had here.  This
fixture reproduces its contract with real ``asyncore``/``asynchat`` sockets on
this Python: an accepting dispatcher runs ``asyncore.loop`` in a thread and
registers, per TCP connection, a channel class named ``zhttp_channel`` in
``asyncore.socket_map`` with medusa's ``creation_time = int(time.time())``,
a ``closed`` flag set on close, a ``ChannelPipe``-like response stdout with
``_channel``, and a request with ``.environ`` (``channel.creation_time``,
``REMOTE_ADDR``) and ``.response.stdout``.
"""

import queue
import socket
import threading
import time
import unittest
import warnings
from types import SimpleNamespace

from collective.streamguard import probes
from collective.streamguard import watcher
from collective.streamguard.tests.helpers import HTTPClient

with warnings.catch_warnings():
    # Deprecated since 3.6, removed in 3.12; ZServer is built on them.
    warnings.simplefilter("ignore", DeprecationWarning)
    import asynchat
    import asyncore


class zhttp_channel(asynchat.async_chat):
    """ZServer's HTTP channel, reduced to what the probes rely on."""

    closed = 0

    def __init__(self, server, conn, addr):
        asynchat.async_chat.__init__(self, conn)  # joins asyncore.socket_map
        self.server = server
        self.addr = addr
        self.creation_time = int(time.time())  # medusa: at TCP connect
        self.reading = True
        self.in_buffer = b""
        self.set_terminator(b"\r\n\r\n")

    def readable(self):
        # reading=False stands for a server that does not read the socket
        # while a request is in flight (the FIN then waits in the kernel).
        return self.reading

    def collect_incoming_data(self, data):
        self.in_buffer += data

    def found_terminator(self):
        self.in_buffer = b""
        self.server.requests.put(FakeRequest(self))

    def close(self):
        self.closed = 1
        asynchat.async_chat.close(self)


class ChannelPipe:
    """ZServer.HTTPResponse.ChannelPipe: ``_channel`` until the response ends."""

    def __init__(self, channel):
        self._channel = channel

    def close(self):
        self._channel = None


class FakeRequest:
    def __init__(self, channel):
        self.environ = {
            "channel.creation_time": channel.creation_time,
            "REMOTE_ADDR": channel.addr[0],
        }
        self.response = SimpleNamespace(stdout=ChannelPipe(channel))


class zhttp_server(asyncore.dispatcher):
    def __init__(self):
        asyncore.dispatcher.__init__(self)
        self.create_socket(socket.AF_INET, socket.SOCK_STREAM)
        self.bind(("127.0.0.1", 0))
        self.listen(16)
        self.requests = queue.Queue()
        self.calls = queue.Queue()

    def handle_accepted(self, sock, addr):
        zhttp_channel(self, sock, addr)


class AsyncoreServerLayer:
    """A ``zhttp_server`` looping ``asyncore.loop`` in a thread, as a plain
    Python layer: zope.testrunner calls ``setUp``/``tearDown`` (it does not
    call ``setUpClass``); under plain unittest ``setUpClass`` calls them."""

    __bases__ = ()
    __module__ = __name__
    __name__ = "ZSERVER_CONTRACT"

    def __init__(self):
        self.server = self.thread = None
        self.stopping = False
        self._users = 0

    def setUp(self):
        self._users += 1
        if self._users == 1:
            self.server = zhttp_server()
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, args=(self.server,), daemon=True)
            self.thread.start()

    def _loop(self, server):
        while not self.stopping:
            asyncore.loop(timeout=0.01, use_poll=True, count=1)
            while not server.calls.empty():
                server.calls.get()()

    def tearDown(self):
        self._users -= 1
        if self._users > 0:
            return
        self.stopping = True
        self.thread.join(5)
        for dispatcher in list(asyncore.socket_map.values()):
            if dispatcher is self.server or getattr(dispatcher, "server", None) is self.server:
                dispatcher.close()
        assert not self.thread.is_alive(), "asyncore loop thread did not stop"


ZSERVER_CONTRACT = AsyncoreServerLayer()


class ZServerContractTestCase(unittest.TestCase):
    layer = ZSERVER_CONTRACT

    @classmethod
    def setUpClass(cls):
        cls.layer.setUp()

    @classmethod
    def tearDownClass(cls):
        cls.layer.tearDown()

    @property
    def server(self):
        return self.layer.server

    def setUp(self):
        self.clients = []
        probes._warned_ambiguous = False

    def tearDown(self):
        watcher.stop()
        for sock in self.clients:
            sock.close()

    def connect(self):
        sock = HTTPClient(self.server.socket.getsockname()[:2], timeout=5)
        self.clients.append(sock)
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock, self.server.requests.get(timeout=5)

    def in_loop(self, function):
        """Run ``function`` in the asyncore thread, as ZServer would."""
        done = threading.Event()
        self.server.calls.put(lambda: (function(), done.set()))
        self.assertTrue(done.wait(5))

    def assert_becomes(self, connection, state):
        deadline = time.monotonic() + 5
        while connection.state().state is not state and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertIs(connection.state().state, state)
