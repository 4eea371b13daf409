"""A real cluster for tests: ZEO, two Zope instances, HAProxy in front.

``CLUSTER`` is a layer (set up once for the classes that use it): ``runzeo``,
two ``runwsgi`` instances as its ZEO clients, and HAProxy with the shipped
``etc/haproxy.cfg.in``, rendered as `make cluster` renders it
(``scripts/cluster.py``), all on free loopback ports.  The instances serve
Zope (no Plone, so that they start in seconds) with the add-on and the test
views, and trust the balancer's X-Forwarded-For as `make cluster` sets them.

What tests use:

- ``layer.balancer``: (host, port) of HAProxy; ``layer.balancer_url``;
- ``layer.instances``: ``ClusterInstance`` objects with ``name`` (its
  ``instance-name``), ``port``, ``url``, ``app_log`` (the file its log
  ``app`` follows: each instance has its own, under the same name, as on
  hosts of a real cluster), ``stream_log`` (the add-on's lines: "stream N
  ended (reason)"), ``events()`` (what the test views recorded),
  ``status()`` (its ``@@stream-status`` JSON), ``configure(**settings)``
  (its stream settings, e.g. ``max_streams_per_user=1``; the layer's
  defaults are restored by ``layer.reset_settings()``), ``stop(signum)``;
- ``layer.restart(instance)``: start a stopped instance again and wait
  until HAProxy sends it requests;
- ``layer.open_gate(tag)``: let a ``@@streamguard-cluster-write`` producer
  finish; ``layer.servers_up()``: HAProxy's view of the page backend.
"""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import unittest

from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import basic_auth
from collective.streamguard.tests.helpers import http_request
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.helpers import wait_until_serving
from collective.streamguard.tests.servers import SRC
from collective.streamguard.tests.servers import NotInstalled
from collective.streamguard.tests.servers import executable
from collective.streamguard.tests.servers import free_port
from collective.streamguard.tests.servers import may_be_missing
from collective.streamguard.tests.servers import stop_processes
from collective.streamguard.tests.zopeinstance import ZopeInstance

ROOT = os.path.dirname(SRC)
ADMIN = ("admin", "admin")
AUTH_HEADER = {"Authorization": basic_auth(*ADMIN)}
THREADS = 4

SITE_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="Zope2.App" />
  <include package="collective.streamguard" />
  <include package="collective.streamguard.tests" file="test.zcml" />
  <include package="collective.streamguard.tests" file="cluster.zcml" />
</configure>
"""

INSTANCE_NAME = """
<product-config collective.streamguard>
  instance-name {name}
</product-config>
"""

#: A second configuration file given to HAProxy next to the shipped one:
#: its admin socket, where the tests read the servers' states.
HAPROXY_TEST_CONFIG = """\
global
    stats socket {socket} mode 600 level admin
"""


def make_cluster_script():
    """``scripts/cluster.py`` of this checkout, as a module: the renderer
    of HAProxy's configuration and the instances' proxy settings."""
    path = os.path.join(ROOT, "scripts", "cluster.py")
    spec = importlib.util.spec_from_file_location("streamguard_cluster_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def haproxy_executable():
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if path:
        return path
    if may_be_missing("haproxy"):
        raise unittest.SkipTest("haproxy is not installed (STREAMGUARD_SKIP_MISSING allows it)")
    raise NotInstalled(
        "HAProxy is not installed; `make test` installs Debian's haproxy "
        "(make system-packages), or: apt-get install haproxy"
    )


class ClusterInstance:
    """One runwsgi instance of the cluster (see the module docstring)."""

    def __init__(self, name, zeo, directory):
        self.name = name
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        proxy = make_cluster_script().PROXY_SETTINGS.format(host=HOST)
        options = dict(line.split(" = ", 1) for line in proxy.splitlines())
        options.update(asyncore_use_poll="true", connection_limit=3000)
        self.zope = ZopeInstance(self.port, zeo=zeo, server_options=options, stream_log=True)
        home = self.zope.home
        with open(os.path.join(home, "etc", "site.zcml"), "w") as f:
            f.write(SITE_ZCML)
        with open(self.zope.zope_conf, "a") as f:
            f.write(INSTANCE_NAME.format(name=name))
        from Zope2.utilities.mkwsgiinstance import write_inituser

        write_inituser(os.path.join(home, "inituser"), *ADMIN)
        self.app_log = os.path.join(home, "var", "app.log")
        self.stream_log = self.zope.stream_log
        self.event_log = self.zope.event_log
        self.settings_path = os.path.join(home, "settings.json")
        for path in (self.app_log, self.stream_log):
            open(path, "a").close()
        self.env = {
            **os.environ,
            **self.zope.env,
            "STREAMGUARD_CLUSTER_SETTINGS": self.settings_path,
            "STREAMGUARD_CLUSTER_GATES": os.path.join(directory, "gates"),
        }
        self.output_path = os.path.join(home, "var", "runwsgi.out")
        self.process = None
        self.reset_settings()

    def reset_settings(self):
        #: No per-user limit: the tests' viewers are all one user.
        self.configure()

    def configure(self, **settings):
        values = {
            "max_streams_per_user": 0,
            "max_parked_streams": 0,
            "log_files": [f"app|{self.app_log}"],
            **settings,
        }
        # Replaced in one step: the instance reads it while it is written.
        temporary = self.settings_path + ".new"
        with open(temporary, "w") as f:
            json.dump(values, f)
        os.replace(temporary, self.settings_path)

    def start(self):
        with open(self.output_path, "ab") as output:
            self.process = subprocess.Popen(
                [executable("runwsgi"), self.zope.zope_ini],
                env=self.env,
                cwd=self.zope.home,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        wait_until_serving(self.port, self.process)

    def stop(self, signum=signal.SIGTERM, timeout=30.0):
        """Send ``signum`` and wait until the process exited; its exit status."""
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"{self.name} did not stop within {timeout} s") from None

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def events(self, name=None, **match):
        return self.zope.events(name, **match)

    def status(self):
        status, _, body = http_request(
            (HOST, self.port), "/@@stream-status?format=json", auth=ADMIN, timeout=30
        )
        if status != 200:
            raise AssertionError(f"{self.name}'s @@stream-status answered {status}: {body[:300]!r}")
        return json.loads(body)

    def stream_log_text(self):
        with open(self.stream_log, errors="replace") as f:
            return f.read()

    def remove(self):
        self.zope.remove()


class ClusterLayer:
    """runzeo, two runwsgi instances and HAProxy (see the module docstring)."""

    __bases__ = ()
    __module__ = __name__
    __name__ = "CLUSTER"

    skip_reason = None

    def setUp(self):
        self.processes = []
        self.instances = []
        self.skip_reason = None
        self.directory = tempfile.mkdtemp(prefix="streamguard-cluster-")
        try:
            self._start()
        except unittest.SkipTest as skip:
            # Only for a program STREAMGUARD_SKIP_MISSING allows to be
            # missing: zope.testrunner cannot skip a layer, so its tests
            # skip themselves (ClusterTestCase.setUp).
            self.skip_reason = str(skip)
        except BaseException:
            self.tearDown()
            raise

    def _start(self):
        haproxy = haproxy_executable()
        os.makedirs(os.path.join(self.directory, "gates"))
        zeo_port = free_port()
        zeo = subprocess.Popen(
            [
                executable("runzeo"),
                "-a",
                f"{HOST}:{zeo_port}",
                "-f",
                os.path.join(self.directory, "Data.fs"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(zeo)
        wait_until_serving(zeo_port, zeo, timeout=30.0, path=None)
        for n in (1, 2):
            instance = ClusterInstance(f"instance{n}", f"{HOST}:{zeo_port}", self.directory)
            self.instances.append(instance)
            # One after the other: the first creates the root objects (and
            # the admin user) in the new storage, which the second then finds.
            instance.start()
        self.port = free_port()
        self.balancer = (HOST, self.port)
        self.balancer_url = f"http://{HOST}:{self.port}"
        config = make_cluster_script().haproxy_config(
            f"{HOST}:{self.port}",
            [(i.name, f"{HOST}:{i.port}") for i in self.instances],
            THREADS,
        )
        self.haproxy_config = os.path.join(self.directory, "haproxy.cfg")
        with open(self.haproxy_config, "w") as f:
            f.write(config)
        self.haproxy_socket = os.path.join(self.directory, "haproxy.sock")
        test_config = os.path.join(self.directory, "haproxy-test.cfg")
        with open(test_config, "w") as f:
            f.write(HAPROXY_TEST_CONFIG.format(socket=self.haproxy_socket))
        self.haproxy_output = os.path.join(self.directory, "haproxy.out")
        with open(self.haproxy_output, "wb") as output:
            process = subprocess.Popen(
                [haproxy, "-db", "-f", self.haproxy_config, "-f", test_config],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        self.haproxy = process
        wait_until_serving(self.port, process, timeout=30.0, ready=lambda status, _: status == 200)
        if not wait_for(lambda: self.servers_up() == {i.name for i in self.instances}, 30):
            raise AssertionError(f"HAProxy does not see every instance up: {self.servers_up()}")

    def haproxy_command(self, command):
        """The answer of HAProxy's admin socket to ``command``."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(self.haproxy_socket)
            sock.sendall(command.encode() + b"\n")
            answer = bytearray()
            while chunk := sock.recv(65536):
                answer += chunk
        return answer.decode()

    def servers_up(self):
        """The names of the page backend's servers HAProxy sees up."""
        lines = self.haproxy_command("show stat").splitlines()
        fields = lines[0].lstrip("# ").split(",")
        up = set()
        for line in lines[1:]:
            row = dict(zip(fields, line.split(","), strict=False))
            server = row.get("svname") not in ("BACKEND", "FRONTEND")
            if row.get("pxname") == "pages" and server and row.get("status") == "UP":
                up.add(row["svname"])
        return up

    def restart(self, instance):
        """Start a stopped ``instance`` again; return once HAProxy sends it
        requests (its health check passed)."""
        instance.start()
        if not wait_for(lambda: instance.name in self.servers_up(), 30):
            raise AssertionError(f"HAProxy does not see {instance.name} up again")

    def open_gate(self, tag):
        open(os.path.join(self.directory, "gates", tag), "w").close()

    def reset_settings(self):
        for instance in self.instances:
            instance.reset_settings()

    def tearDown(self):
        for instance in reversed(self.instances):
            try:
                instance.stop()
            except AssertionError:
                pass  # killed
        stop_processes(self.processes)
        for instance in self.instances:
            instance.remove()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.processes, self.instances = [], []


CLUSTER = ClusterLayer()
