"""The README's CSV export and batch job on the job pool, on a real Plone site.

``PLONE_POOL``: plone.app.testing's site with the README's package
(``streamguard_newcomer``: its views as written there) and the README's
jobs' documents (``readmejobs.add_documents``, made once for the layer),
served by the add-on's real waitress (4 threads) over real sockets; the
pool runs in this process.  The test reads the database in a connection
of its own (``committed_site``), opened after what it checks.  The checks
are those of the same jobs on a worker (``readmejobs``).
"""

import unittest

from plone.app.testing import SITE_OWNER_NAME
from plone.app.testing import SITE_OWNER_PASSWORD
from plone.app.testing import FunctionalTesting
from plone.app.testing import PloneSandboxLayer

from collective.streamguard import jobs
from collective.streamguard.testing import WAITRESS_SERVER_FIXTURE
from collective.streamguard.testing import committed_site
from collective.streamguard.testing import open_stream
from collective.streamguard.testing import wait_for_streams_to_end
from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import wait_for
from streamguard_newcomer.testing import NEWCOMER_FIXTURE
from streamguard_newcomer.tests.readmejobs import HELD
from streamguard_newcomer.tests.readmejobs import ReadmeJobChecks
from streamguard_newcomer.tests.readmejobs import add_documents

OWNER = (SITE_OWNER_NAME, SITE_OWNER_PASSWORD)
SITE_ID = "plone"


class ReadmeDocumentsLayer(PloneSandboxLayer):
    """The README's package's site with the README's jobs' documents."""

    defaultBases = (NEWCOMER_FIXTURE,)

    def setUpPloneSite(self, portal):
        from plone.dexterity.utils import createContentInContainer

        add_documents(portal, createContentInContainer)


README_DOCUMENTS_FIXTURE = ReadmeDocumentsLayer()

PLONE_POOL = FunctionalTesting(
    bases=(README_DOCUMENTS_FIXTURE, WAITRESS_SERVER_FIXTURE),
    name="ReadmeDocumentsLayer:Waitress",
)


def pool_jobs_done():
    """True once no job of the pool is live (their cleanups ran)."""
    return wait_for(lambda: not jobs.job_streams.live())


class TestReadmeProducersOnThePool(ReadmeJobChecks, unittest.TestCase):
    layer = PLONE_POOL

    def setUp(self):
        del views.EVENTS[:]
        self.clients = []

    def tearDown(self):
        for client in self.clients:
            client.close()
        self.assertTrue(wait_for_streams_to_end())
        self.assertTrue(pool_jobs_done())

    def open(self, view, **options):
        client = open_stream(self.layer, f"/{SITE_ID}/{view}", auth=OWNER, **options)
        self.clients.append(client)
        return client

    def test_csv_export_gives_the_same_bytes_on_the_pool_as_in_process(self):
        started = jobs.pool.snapshot()["started"]
        in_process = self.open("@@documents-csv").body()
        self.assertEqual(jobs.pool.snapshot()["started"], started)
        on_pool = self.open("@@documents-csv-on-the-pool").body()
        self.assertSameExport(in_process, on_pool)
        # The pool made the second one.
        self.assertEqual(jobs.pool.snapshot()["started"], started + 1)

    def test_client_leaving_mid_batch_stops_the_job_and_aborts_since_the_last_commit(self):
        form = self.open("@@retitle-documents-on-the-pool").body()
        gone = jobs.pool.snapshot()["ended"].get("client gone", 0)
        job = self.open(
            "@@retitle-documents-on-the-pool",
            method="POST",
            form={"_authenticator": self.authenticator(form)},
        )
        job.read_until(self.held_line(SITE_ID))
        # The job is in the step of document HELD when its client leaves.
        self.assertTrue(wait_for(lambda: views.events("held", n=HELD)))
        job.close()
        self.assertTrue(wait_for(lambda: views.events("resumed", n=HELD)))
        self.assertEqual(views.events("hold-timeout"), [])
        # Its stream ended on the pool: the transaction aborted, the
        # cleanups ran, once.
        self.assertTrue(pool_jobs_done())
        self.assertEqual(jobs.pool.snapshot()["ended"].get("client gone", 0), gone + 1)
        self.assertEqual([e["reason"] for e in views.events("cleanup")], ["client gone"])
        steps = views.events("step")
        self.assertStoppedInTheHeldStep([e["n"] for e in steps])
        # Every step ran on a job thread, none on waitress'.
        self.assertEqual([e for e in steps if not e["thread"].startswith("streamguard-jobs")], [])
        self.assertAbortedSinceTheLastCommit(
            committed_site(self, SITE_ID), self.layer["zodbDB"], "", SITE_OWNER_NAME
        )
        # The slot is free: the pool takes the next job.
        self.assertEqual(jobs.pool.snapshot()["running"], 0)
        self.assertTrue(self.open("@@documents-csv-on-the-pool").body())
