"""The README's CSV export and batch job on a worker, on a real Plone site.

``ploneworkers.PLONE_WORKERS``: a Plone site on ZEO, one web instance
(runwsgi), Redis and one ``streamguard-worker``, all real, on loopback; the
views are the README's (``streamguard_newcomer``), as written there.  The
test process reads the database as another ZEO client, in a connection of
its own opened after what it checks.
"""

import re
import socket
import unittest

from collective.streamguard.tests.helpers import ENDED
from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.ploneworkers import ADMIN
from collective.streamguard.tests.ploneworkers import DOCUMENTS
from collective.streamguard.tests.ploneworkers import HELD
from collective.streamguard.tests.ploneworkers import PLONE_WORKERS
from collective.streamguard.tests.ploneworkers import SITE_ID
from streamguard_newcomer.views import BATCH_SIZE


def as_text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


class TestReadmeProducersOnAWorker(unittest.TestCase):
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
        """``function(site, connection)`` in a new connection of the database."""
        connection = self.db.open()
        try:
            connection.sync()
            return function(connection.root()["Application"][SITE_ID], connection)
        finally:
            connection.close()

    def test_csv_export_gives_the_same_bytes_on_a_worker_as_in_process(self):
        finished = len(self.ended("finished"))
        in_process = self.open("@@documents-csv").body(120)
        on_worker = self.open("@@documents-csv-on-a-worker").body(120)
        rows = in_process.decode().splitlines()
        self.assertEqual(rows[0], "path,title,modified")
        self.assertEqual(len(rows), DOCUMENTS + 1)
        self.assertGreater(len(in_process), 64 * 1024)  # more than one chunk
        self.assertEqual(on_worker, in_process)
        # The worker made the second one.
        self.assertTrue(wait_for(lambda: len(self.ended("finished")) == finished + 1, 30))

    def test_client_leaving_mid_batch_stops_the_job_and_aborts_since_the_last_commit(self):
        self.assertLess(BATCH_SIZE, HELD)  # the job is held after a commit
        form = self.open("@@retitle-documents-on-a-worker").body(120)
        authenticator = re.search(rb'name="_authenticator" value="([^"]+)"', form)
        self.assertIsNotNone(authenticator, form[:2000])
        gone = len(self.ended("client gone"))
        job = self.open(
            "@@retitle-documents-on-a-worker",
            method="POST",
            form={"_authenticator": authenticator.group(1).decode()},
        )
        job.read_until(f"{HELD} /{SITE_ID}/doc-{HELD - 1:03d}\n".encode(), 120)
        # The job is in the step of document HELD when its client leaves.
        self.assertTrue(wait_for(lambda: self.layer.web.events("held", n=HELD), 60))
        job.close()
        self.assertTrue(wait_for(lambda: self.layer.web.events("resumed", n=HELD), 60))
        self.assertEqual(self.layer.web.events("hold-timeout"), [])
        # Its stream ended on the worker: the transaction aborted, the
        # cleanups ran (the end line is logged after them).
        self.assertTrue(wait_for(lambda: len(self.ended("client gone")) == gone + 1, 60))
        # It stopped within that step: no document after it was touched.
        steps = [e["n"] for e in self.layer.web.events("step")]
        self.assertEqual(steps, list(range(HELD + 1)))

        def state(site, connection):
            catalog = site.portal_catalog
            titles, indexed, history = [], [], {}
            for n in range(DOCUMENTS):
                document = site[f"doc-{n:03d}"]
                titles.append(str(document.title).split()[:2])
                path = f"/{SITE_ID}/doc-{n:03d}"
                indexed.append(str(catalog.getMetadataForUID(path)["Title"]).split()[:2])
                if n in (0, BATCH_SIZE - 1, BATCH_SIZE):
                    history[n] = self.db.history(document._p_oid, size=1)[0]
            return titles, indexed, history

        titles, indexed, history = self.read(state)
        expected = [["DOCUMENT", f"{n:03d}"] for n in range(BATCH_SIZE)]
        expected += [["document", f"{n:03d}"] for n in range(BATCH_SIZE, DOCUMENTS)]
        self.assertEqual(titles, expected)
        self.assertEqual(indexed, expected)  # the catalog followed the commit
        # The first BATCH_SIZE documents were committed together, by the
        # worker's transaction, as the user who asked; the next one not since.
        committed = history[0]
        self.assertEqual(history[BATCH_SIZE - 1]["tid"], committed["tid"])
        worker = f"worker {socket.gethostname()}:{self.layer.worker.pid}"
        self.assertEqual(
            as_text(committed["description"]),
            f"/{SITE_ID} (collective.streamguard stream, {worker})",
        )
        self.assertEqual(as_text(committed["user_name"]).split(), [ADMIN[0]])
        self.assertNotEqual(history[BATCH_SIZE]["tid"], committed["tid"])
        self.assertNotIn("collective.streamguard", as_text(history[BATCH_SIZE]["description"]))
        # The worker is free: it takes the next job.
        self.assertTrue(self.open("@@documents-csv-on-a-worker").body(120))
