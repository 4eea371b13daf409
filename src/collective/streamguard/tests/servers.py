"""Real HTTP servers in subprocesses, and raw-socket clients, for tests.

``Server`` starts waitress, gunicorn or uWSGI (found next to
``sys.executable``, never a global install) on a free loopback port, serving
any ``"module:callable"`` app with extra ``PYTHONPATH`` entries and
environment, and stops it with bounded timeouts.  ``ServerLayer`` makes
one a test fixture, with the ``wsgiapps.EventSink`` its app reports to.
Later tests reuse both for the Zope WSGI app.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import unittest

from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import NotServing
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.helpers import wait_until_serving
from collective.streamguard.tests.wsgiapps import EventSink

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
TEST_APP = "collective.streamguard.tests.wsgiapps:app"


#: Executables that may be missing in this environment (comma or space
#: separated, e.g. ``uwsgi``): the tests that need one that is missing are
#: skipped instead of failing.  For the buildout route only: it cannot build
#: uWSGI's binary, makes only the scripts its ``[servers]`` part lists, and
#: does not install ZServer (``zserver``: see ``testing.ZServerServer``).
#: ``make test`` installs every server (the test extra, and ZServer).
SKIP_MISSING_ENV = "STREAMGUARD_SKIP_MISSING"


class NotInstalled(RuntimeError):
    pass


def may_be_missing(name):
    return name in os.environ.get(SKIP_MISSING_ENV, "").replace(",", " ").split()


def executable(name):
    """Path of a server script installed next to ``sys.executable``.

    A missing one is a broken test install, and fails the tests that need
    it: a skipped test proves nothing, and ``make test`` installs them all.
    Only an executable named in ``STREAMGUARD_SKIP_MISSING`` skips them.
    """
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(path, os.X_OK):
        return path
    if may_be_missing(name):
        raise unittest.SkipTest(
            f"{name} is not installed next to {sys.executable} ({SKIP_MISSING_ENV} allows it)"
        )
    raise NotInstalled(
        f"{name} is not installed next to {sys.executable}; run `make test`, "
        f"which installs the test extra (where {name} cannot be installed, "
        f"{SKIP_MISSING_ENV}={name} skips the tests that need it)"
    )


def stop_processes(processes):
    """Stop server processes, the last started first: SIGTERM, then SIGKILL
    after 20 s."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerFailed(RuntimeError):
    pass


class Server:
    """One server process.

    ``kind``: "waitress", "gunicorn" or "uwsgi".  ``options``: server
    settings, e.g. ``{"threads": 4, "channel_request_lookahead": 1}`` for
    waitress, ``{"worker_class": "gthread", "threads": 4}`` for gunicorn,
    ``{"threads": 4, "keepalive": True}`` for uWSGI (``--http11-socket``
    instead of ``--http-socket``); True means a bare flag.  ``env`` is
    added to the environment, ``pythonpath`` prepended to PYTHONPATH (the
    package's ``src`` is always there).  The server is up once
    ``GET ready_path`` answers ``ready_body`` (with ``ready_body=None``: any
    status below 500), e.g. ``ready_path="/"`` for a Zope app.
    """

    STOP_SIGNAL = {
        "waitress": signal.SIGTERM,
        "gunicorn": signal.SIGINT,
        "uwsgi": signal.SIGINT,
    }

    def __init__(
        self,
        kind,
        app=TEST_APP,
        options=None,
        env=None,
        pythonpath=(),
        directory=None,
        startup_timeout=30.0,
        ready_path="/ping",
        ready_body=b"pong",
    ):
        if kind not in self.STOP_SIGNAL:
            raise ValueError(f"unknown server kind {kind!r}")
        self.kind = kind
        self.app = app
        self.options = dict(options or {})
        self.env = dict(env or {})
        self.pythonpath = [*pythonpath, SRC]
        self.directory = directory
        self.startup_timeout = startup_timeout
        self.ready_path = ready_path
        self.ready_body = ready_body
        self.process = None
        self.port = None
        self.log_path = None

    def command(self, port):
        opts = dict(self.options)
        if self.kind == "waitress":
            cmd = [executable("waitress-serve"), f"--listen={HOST}:{port}"]
            cmd += [
                f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in opts.items()
            ]
            return cmd + [self.app]
        if self.kind == "gunicorn":
            opts.setdefault("workers", 1)
            # Streams outlive gunicorn's 30 s worker timeout in the sync worker.
            opts.setdefault("timeout", 120)
            opts.setdefault("graceful_timeout", 1)
            # gunicorn >= 24 opens a control socket in ~/.gunicorn by default.
            opts.setdefault("no_control_socket", True)
            cmd = [executable("gunicorn"), "--bind", f"{HOST}:{port}"]
            return cmd + self._flags(opts) + [self.app]
        opts.setdefault("need_app", True)
        opts.setdefault("die_on_term", True)
        opts.setdefault("disable_logging", True)
        # --http-socket closes after every response; --http11-socket keeps
        # the connection alive.  Either way the app's fd is the client's.
        socket_flag = "--http11-socket" if opts.pop("keepalive", False) else "--http-socket"
        # The uwsgi binary embeds libpython; home points it at this venv.
        cmd = [
            executable("uwsgi"),
            socket_flag,
            f"{HOST}:{port}",
            "--home",
            sys.prefix,
            "--module",
            self.app,
        ]
        return cmd + self._flags(opts)

    @staticmethod
    def _flags(opts):
        flags = []
        for key, value in opts.items():
            flags.append("--" + key.replace("_", "-"))
            if value is not True:
                flags.append(str(value))
        return flags

    @property
    def address(self):
        return (HOST, self.port)

    def start(self):
        self._own_directory = self.directory is None
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="sg-")
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            self.pythonpath + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env["PYTHONUNBUFFERED"] = "1"
        for _attempt in range(3):
            # free_port() races with other processes; a server that cannot
            # bind exits, and we try another port.
            port = free_port()
            self.log_path = os.path.join(self.directory, f"{self.kind}-{port}.log")
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    self.command(port),
                    env=env,
                    cwd=self.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.port = port
            if self._wait_ready():
                return self
            self.stop()
        raise ServerFailed(f"{self.kind} did not start:\n{self.log_tail()}")

    def _wait_ready(self):
        def ready(status, body):
            return status < 500 if self.ready_body is None else body == self.ready_body

        try:
            wait_until_serving(
                self.port, self.process, self.startup_timeout, path=self.ready_path, ready=ready
            )
        except NotServing:
            return False
        return True

    def stop(self, timeout=10.0):
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is not None:
            # Already reaped (poll() saw it exit, e.g. a failed start): its
            # pid and group id may belong to someone else by now.
            return
        # start_new_session: the server's pid is its process group, which
        # reaches gunicorn's forked worker too, and nothing else.  The group
        # id stays ours only until the leader is reaped, so signal the group
        # before reaping.
        self._signal_group(process, self.STOP_SIGNAL[self.kind])
        if not self._exited(process, timeout):
            self._signal_group(process, signal.SIGKILL)
            self._exited(process, timeout)
        self._signal_group(process, signal.SIGKILL)  # any straggling worker
        process.wait(timeout)

    @staticmethod
    def _signal_group(process, signum):
        try:
            os.killpg(process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    @staticmethod
    def _exited(process, timeout):
        """Wait for the leader to exit without reaping it."""
        # No event tells of an exit we may not reap: ask again every 10 ms.
        return bool(
            wait_for(
                lambda: os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT),
                timeout,
            )
        )

    def cleanup(self):
        self.stop()
        if getattr(self, "_own_directory", False):
            shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, size=4000):
        try:
            with open(self.log_path, "rb") as log:
                return log.read()[-size:].decode("utf-8", "replace")
        except (OSError, TypeError):
            return "(no log)"


class ServerLayer:
    """One ``Server`` plus its ``EventSink`` as a test fixture.

    It is a layer in zope.testrunner's sense (``__bases__``, ``__name__``,
    ``setUp``, ``tearDown``) but plain Python: zope.testrunner calls it for
    the classes whose ``layer`` it is, and does not call ``setUpClass``;
    plain unittest ignores ``layer``, so the classes' ``setUpClass`` calls it
    too.  Set-ups are counted, so a runner doing both starts one server.
    """

    __bases__ = ()

    def __init__(
        self,
        name,
        kind,
        options=None,
        app=TEST_APP,
        env=None,
        pythonpath=(),
        module=None,
        **server_options,
    ):
        self.__name__ = name
        self.__module__ = module or __name__
        self.kind = kind
        self.options = options
        self.app = app
        self.env = dict(env or {})
        self.pythonpath = pythonpath
        self.server_options = server_options  # more Server() arguments
        self.server = self.sink = self.directory = None
        self.skip_reason = None
        self._users = 0

    def __repr__(self):
        return f"<ServerLayer {self.__module__}.{self.__name__}>"

    def setUp(self):
        self._users += 1
        if self._users > 1:
            return
        try:
            self.server = self.make_server()
            self.server.start()
        except unittest.SkipTest as skip:
            # Only for a server STREAMGUARD_SKIP_MISSING allows to be
            # missing.  A layer cannot be skipped under zope.testrunner: let
            # the tests skip themselves (their setUp asks for skip_reason).
            self.skip_reason = str(skip)
        except BaseException:
            self._users = 1
            self.tearDown()
            raise

    def make_server(self):
        """The ``Server`` this layer runs (not started yet)."""
        self.directory = tempfile.mkdtemp(prefix="sg-")
        self.sink = EventSink(self.directory)
        return Server(
            self.kind,
            app=self.app,
            options=self.options,
            env={**self.env, **self.sink.env},
            pythonpath=self.pythonpath,
            directory=self.directory,
            **self.server_options,
        )

    def tearDown(self):
        self._users -= 1
        if self._users > 0:
            return
        self._users = 0
        self.skip_reason = None
        if self.server is not None:
            self.server.stop()
        self.server = None
        self.dispose()

    def dispose(self):
        """Remove what ``make_server`` made besides the server."""
        if self.sink is not None:
            self.sink.close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.sink = self.directory = None


# Raw-socket clients: the tests need control over FIN, RST, pipelining and
# keep-alive that no HTTP client library gives.


class LayerTestCase:
    """Mixin for test classes whose ``layer`` is a ``ServerLayer``: sets it
    up under plain unittest too (see ``ServerLayer``), and skips the tests
    when the layer's server may be and is missing."""

    layer = None

    @classmethod
    def setUpClass(cls):
        cls.layer.setUp()  # plain unittest; zope.testrunner uses the layer

    @classmethod
    def tearDownClass(cls):
        cls.layer.tearDown()

    def setUp(self):
        if self.layer.skip_reason:
            self.skipTest(self.layer.skip_reason)


def request_bytes(path, close=False):
    headers = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n"
    if close:
        headers += "Connection: close\r\n"
    return (headers + "\r\n").encode()


def connect(server, timeout=10.0):
    return HTTPClient(server.address, timeout=timeout)
