"""The README's CSV export and batch job on a worker, on a real Plone site.

``ploneworkers.PLONE_WORKERS``: a Plone site on ZEO, one web instance
(runwsgi), Redis and one ``streamguard-worker``, all real, on loopback; the
views are the README's (``streamguard_newcomer``), as written there.  The
test process reads the database as another ZEO client, in a connection of
its own opened after what it checks.  The checks are shared with the same
jobs on the pool (``readmejobs``).
"""

import json
import socket
import unittest

from collective.streamguard import workers
from collective.streamguard.tests.helpers import ENDED
from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import wait_for
from streamguard_newcomer.tests.ploneworkers import ADMIN
from streamguard_newcomer.tests.ploneworkers import PLONE_WORKERS
from streamguard_newcomer.tests.ploneworkers import SITE_ID
from streamguard_newcomer.tests.readmejobs import HELD
from streamguard_newcomer.tests.readmejobs import ReadmeJobChecks


class TestReadmeProducersOnAWorker(ReadmeJobChecks, unittest.TestCase):
    layer = PLONE_WORKERS

    def setUp(self):
        import ZEO

        self.db = ZEO.DB((HOST, self.layer.zeo_port))
        self.addCleanup(self.db.close)

    def open(self, path, **options):
        client = HTTPClient((HOST, self.layer.web.port), timeout=60)
        self.addCleanup(client.close)
        return client.request(f"/{SITE_ID}/{path}", auth=ADMIN, **options)

    def ended(self, reason):
        """The worker's streams that ended with ``reason`` (its log lines)."""
        return [m for m in ENDED.finditer(self.layer.worker_output()) if m.group(2) == reason]

    def read(self, function):
        """``function(site)`` in a new connection of the database."""
        connection = self.db.open()
        try:
            connection.sync()
            return function(connection.root()["Application"][SITE_ID])
        finally:
            connection.close()

    def test_csv_export_gives_the_same_bytes_on_a_worker_as_in_process(self):
        finished = len(self.ended("finished"))
        in_process = self.open("@@documents-csv").body(120)
        on_worker = self.open("@@documents-csv-on-a-worker").body(120)
        self.assertSameExport(in_process, on_worker)
        # The worker made the second one.
        self.assertTrue(wait_for(lambda: len(self.ended("finished")) == finished + 1, 30))

    def test_client_leaving_mid_batch_stops_the_job_and_aborts_since_the_last_commit(self):
        form = self.open("@@retitle-documents-on-a-worker").body(120)
        gone = len(self.ended("client gone"))
        job = self.open(
            "@@retitle-documents-on-a-worker",
            method="POST",
            form={"_authenticator": self.authenticator(form)},
        )
        job.read_until(self.held_line(SITE_ID), 120)
        # The job is in the step of document HELD when its client leaves.
        self.assertTrue(wait_for(lambda: self.layer.web.events("held", n=HELD), 60))
        job.close()
        self.assertTrue(wait_for(lambda: self.layer.web.events("resumed", n=HELD), 60))
        self.assertEqual(self.layer.web.events("hold-timeout"), [])
        # Its stream ended on the worker: the transaction aborted, the
        # cleanups ran (the end line is logged after them).
        self.assertTrue(wait_for(lambda: len(self.ended("client gone")) == gone + 1, 60))
        self.assertStoppedInTheHeldStep([e["n"] for e in self.layer.web.events("step")])
        worker = f"worker {socket.gethostname()}:{self.layer.worker.pid}"
        self.read(
            lambda site: self.assertAbortedSinceTheLastCommit(site, self.db, worker, ADMIN[0])
        )
        # The worker is free: it takes the next job.
        self.assertTrue(self.open("@@documents-csv-on-a-worker").body(120))

    def test_status_page_shows_the_workers_that_serve_the_broker(self):
        import redis

        name = f"{socket.gethostname()}:{self.layer.worker.pid}"

        def up():
            answer = json.loads(self.open("@@stream-status?format=json").body(60))
            return name in (answer["workers"]["up"] or [])

        self.assertTrue(wait_for(up, 60))
        # A worker's name comes from Redis: whoever can write it chooses it.
        broker = redis.Redis.from_url(self.layer.broker_url)
        self.addCleanup(broker.close)
        forged = "<b>forged</b>&"
        broker.set(workers.PRESENCE + forged, "{}", ex=workers.LEASE)
        self.addCleanup(broker.delete, workers.PRESENCE + forged)
        page = self.open("@@stream-status").body(60).decode()
        self.assertIn(f'<span class="streamguard-worker">{name}</span>', page)
        escaped = "&lt;b&gt;forged&lt;/b&gt;&amp;"
        self.assertIn(f'<span class="streamguard-worker">{escaped}</span>', page)
        self.assertNotIn("<b>forged", page)
        self.assertRegex(page, r"<th>Broker</th>\s*<td>configured, answers</td>")
        self.assertRegex(page, r"<th>Jobs queued on the broker \(all instances\)</th>\s*<td>0</td>")
        self.assertRegex(
            page,
            rf"<th>Worker queue bound \(worker-queue-size\)</th>\s*"
            rf"<td>{workers.DEFAULT_QUEUE_SIZE}</td>",
        )
        self.assertNotIn("No broker is configured", page)
