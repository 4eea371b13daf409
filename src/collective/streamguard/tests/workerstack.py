"""What the worker tests start: ZEO, Redis, web instances and workers.

``WorkersLayer`` starts, once for the classes that use it, everything real
on loopback: a ZEO server (``runzeo``), Redis (Debian's ``redis-server``,
with ``requirepass``), a web instance (``runwsgi``, waitress) and a worker
(``streamguard-worker``), both ZEO clients of the same storage, configured
with the same broker and secret.  The tests read the database as a third
ZEO client.

The Zope layer of ``test_workers`` uses it as it is (Zope only, the test
views); the Plone layer of the README package's ``test_plone_workers``
(``streamguard_newcomer.tests.ploneworkers``)
overrides what differs: the instances' ZCML (Plone and the README's
package), and what is in the database before the instances start
(``prepare_script``, run by ``prepare_database``).
"""

import os
import secrets
import shutil
import subprocess
import unittest

from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.helpers import wait_until_serving
from collective.streamguard.tests.servers import executable
from collective.streamguard.tests.servers import free_port
from collective.streamguard.tests.servers import stop_processes
from collective.streamguard.tests.zopeinstance import ZopeInstance

PRODUCT_CONFIG = """
<product-config collective.streamguard>
  worker-broker redis://:{password}@{host}:{port}/0
  worker-secret {secret}
</product-config>
"""
#: A Zope manager that ``prepare_database`` of the Zope layer adds.
MANAGER = ("manager", secrets.token_hex(8))


class WorkersLayer:
    """runzeo, redis-server, a runwsgi web instance and one worker, started
    once for the module; ``start_worker()`` starts another after a test
    killed it, ``start_web()`` another web instance."""

    __bases__ = ()
    __module__ = __name__
    __name__ = "WORKERS"

    #: Seconds an instance or a worker may take to start (Plone's are slower).
    start_timeout = 60.0

    def setUp(self):
        self.processes = []
        self.homes = []
        try:
            self._start()
        except BaseException:
            self.tearDown()
            raise

    def _start(self):
        self.zeo_port = free_port()
        home = self.new_home()
        zeo = self.spawn(
            [
                executable("runzeo"),
                "-a",
                f"{HOST}:{self.zeo_port}",
                "-f",
                os.path.join(home.home, "var", "zeo.fs"),
            ]
        )
        wait_until_serving(self.zeo_port, zeo, timeout=30.0, path=None)
        self.redis_port = free_port()
        self.redis_password = secrets.token_hex(16)
        self.secret = secrets.token_hex(16)
        self.worker_log = os.path.join(home.home, "var", "worker.log")
        self.worker_home = home
        self.start_redis()
        self.broker_url = f"redis://:{self.redis_password}@{HOST}:{self.redis_port}/0"
        self.prepare_database(home)
        # The web instance and the worker start side by side: each loads
        # Zope (and Plone) for seconds.
        self.web, self.web_process = self.spawn_web()
        self.worker = self.spawn_worker()
        wait_until_serving(self.web.port, self.web_process, timeout=self.start_timeout)
        self.wait_for_worker()

    def start_redis(self):
        """Debian's redis-server on the layer's port, with its password and
        no persistence (tests that kill it start it again: what it held is
        gone, as after a crash of a cache-only Redis)."""
        self.redis_process = self.spawn(
            [
                shutil.which("redis-server") or "/usr/bin/redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                HOST,
                "--requirepass",
                self.redis_password,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                os.path.join(self.worker_home.home, "var"),
            ]
        )
        wait_until_serving(self.redis_port, self.redis_process, timeout=30.0, path=None)

    #: What ``prepare_database`` runs in ``zconsole run`` (``app`` is the
    #: root): a Zope manager in the root user folder.
    prepare_script = """\
import transaction

app.acl_users._doAddUser({user!r}, {password!r}, ["Manager"], [])
transaction.commit()
"""

    def script_values(self):
        return {"user": MANAGER[0], "password": MANAGER[1]}

    def prepare_database(self, home):
        """Run ``prepare_script`` (formatted with ``script_values()``) in
        ``zconsole run`` with ``home``'s zope.conf, before the instances
        start.  The first Zope on the storage creates its root objects:
        after this one, the web instance and the worker can start side by
        side without both creating them."""
        script = os.path.join(home.home, "prepare.py")
        with open(script, "w") as f:
            f.write(self.prepare_script.format(**self.script_values()))
        output = os.path.join(home.home, "var", "prepare.out")
        with open(output, "wb") as out:
            prepared = subprocess.run(
                [executable("zconsole"), "run", home.zope_conf, script],
                env={**os.environ, **home.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=self.start_timeout,
            )
        if prepared.returncode:
            with open(output, errors="replace") as f:
                raise AssertionError(f"{script} failed: {f.read()[-3000:]}")

    def new_home(self, port=None):
        home = ZopeInstance(port or free_port(), zeo=f"{HOST}:{self.zeo_port}")
        self.homes.append(home)
        return home

    def spawn(self, args, env=None, log=None):
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        process = subprocess.Popen(
            args, env=env or os.environ.copy(), stdout=out, stderr=subprocess.STDOUT
        )
        if log:
            out.close()
        self.processes.append(process)
        return process

    def configure(self, home):
        with open(home.zope_conf, "a") as f:
            f.write(
                PRODUCT_CONFIG.format(
                    password=self.redis_password,
                    host=HOST,
                    port=self.redis_port,
                    secret=self.secret,
                )
            )

    def spawn_web(self):
        port = free_port()
        home = self.new_home(port)
        self.configure(home)
        home.port = port
        process = self.spawn([executable("runwsgi"), home.zope_ini], env={**os.environ, **home.env})
        return home, process

    def start_web(self):
        home, process = self.spawn_web()
        wait_until_serving(home.port, process, timeout=self.start_timeout)
        return home, process

    def spawn_worker(self):
        home = self.worker_home
        if not getattr(home, "configured", False):
            self.configure(home)
            home.configured = True
        # The worker's producers report to the web instance's events file.
        env = {**os.environ, **home.env, "STREAMGUARD_TEST_EVENTS": self.web.events_path}
        self.worker_started = self.worker_output().count("serves jobs")
        return self.spawn(
            [executable("streamguard-worker"), home.zope_conf], env=env, log=self.worker_log
        )

    def wait_for_worker(self):
        def serving():
            if self.worker.poll() is not None:
                raise AssertionError(f"the worker exited: {self.worker_output()[-3000:]}")
            return self.worker_output().count("serves jobs") > self.worker_started

        if not wait_for(serving, self.start_timeout):
            raise AssertionError(f"the worker did not start: {self.worker_output()[-3000:]}")

    def start_worker(self):
        self.worker = self.spawn_worker()
        self.wait_for_worker()
        return self.worker

    def worker_output(self):
        try:
            with open(self.worker_log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def tearDown(self):
        stop_processes(self.processes)
        for home in self.homes:
            home.remove()
        self.processes, self.homes = [], []


class WorkerStackTestCase(unittest.TestCase):
    """A test of a workers' layer, with a ZEO client of the layer's
    database (``self.db``) and a client of its Redis (``self.redis``)."""

    def setUp(self):
        import redis
        import ZEO

        self.db = ZEO.DB((HOST, self.layer.zeo_port))
        self.addCleanup(self.db.close)
        self.redis = redis.Redis.from_url(self.layer.broker_url)
        self.addCleanup(self.redis.close)
        # The layer's events and the worker's output go on from test to test
        # (and from one repetition to the next, -N): a test reads its own.
        self._events_from = self.layer.web.event_count()
        self._output_from = len(self.layer.worker_output())

    def events(self, name=None, **match):
        """The views' and producers' events recorded since this test began."""
        return self.layer.web.events(name, since=self._events_from, **match)

    def worker_output(self):
        """What the worker processes have written since this test began."""
        return self.layer.worker_output()[self._output_from :]

    def assert_batch_stopped_at_14(self, tag, reason, pid):
        """The batch job ``tag`` (``mode=batch&hold=14``: it waits after
        document 14) was stopped in the step it waited in, in the worker
        ``pid``: its cleanups once with ``reason``, its ``finally`` once, no
        step after it; documents 0-9 committed (at 10), 10-14 aborted.
        (``self.events``: the test class's record of the views' events.)"""
        [cleanup] = self.events("cleanup", tag=tag)
        self.assertEqual((cleanup["reason"], cleanup["pid"]), (reason, pid))
        self.assertEqual(len(self.events("producer-finally", tag=tag)), 1)
        self.assertEqual(max(e["n"] for e in self.events("step", tag=tag)), 14)
        self.assertEqual(self.stored(f"sg_{tag}_9"), 9)
        self.assertIsNone(self.stored(f"sg_{tag}_10"))
        self.assertIsNone(self.stored(f"sg_{tag}_14"))

    def stored(self, name):
        """The app's attribute ``name`` as committed (another ZEO client)."""
        connection = self.db.open()
        try:
            connection.sync()
            return getattr(connection.root()["Application"], name, None)
        finally:
            connection.close()
