"""The README's views on a real Plone site and waitress, tested with what the
README's Testing section shows and nothing else."""

import csv
import io
import re
import unittest

import transaction
from plone.app.testing import SITE_OWNER_NAME
from plone.app.testing import SITE_OWNER_PASSWORD
from plone.app.testing import TEST_USER_ID
from plone.app.testing import setRoles

from collective.streamguard.testing import committed_site
from collective.streamguard.testing import end_reasons
from collective.streamguard.testing import open_stream
from collective.streamguard.testing import wait_for_streams_to_end
from streamguard_newcomer import views
from streamguard_newcomer.testing import NEWCOMER_WAITRESS_TESTING

OWNER = (SITE_OWNER_NAME, SITE_OWNER_PASSWORD)
DOCUMENTS = 40


class TestNewcomerViews(unittest.TestCase):
    layer = NEWCOMER_WAITRESS_TESTING

    def setUp(self):
        portal = self.layer["portal"]
        setRoles(portal, TEST_USER_ID, ["Manager"])
        for n in range(DOCUMENTS):
            portal.invokeFactory("Document", f"doc-{n:02d}", title=f"document {n:02d}")
        # The server reads the database in its own threads: commit.
        transaction.commit()
        self.clients = []

    def tearDown(self):
        for client in self.clients:
            client.close()
        self.assertTrue(wait_for_streams_to_end())

    def open(self, path, **options):
        client = open_stream(self.layer, path, **options)
        self.clients.append(client)
        return client

    def titles(self):
        site = committed_site(self)
        return [site[f"doc-{n:02d}"].title for n in range(DOCUMENTS)]

    def test_slow_report_lists_the_titles(self):
        client = self.open("/plone/@@slow-report")
        self.assertEqual(client.head()[0], 200)
        self.assertEqual(client.body().decode().splitlines()[:2], ["document 00", "document 01"])

    def test_progress_runs_to_the_end(self):
        client = self.open("/plone/@@progress")
        body = client.body().decode()
        self.assertEqual(body.splitlines(), [f"step {n} of 5" for n in range(1, 6)] + ["done"])

    def test_clock_events_are_server_sent_events(self):
        client = self.open("/plone/@@clock-events")
        status, headers = client.head()
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/event-stream"))
        self.assertEqual(headers["cache-control"], "no-store")
        client.read_until(b"id: 1\ndata: ")
        client.read_until(b"id: 2\ndata: ")
        before = end_reasons()["client gone"]
        client.close()
        self.assertTrue(wait_for_streams_to_end())
        self.assertEqual(end_reasons()["client gone"], before + 1)

    def test_four_progress_streams_leave_a_thread_for_pages(self):
        # Four anonymous browsers, each from an address of its own: the
        # fourth plain-generator stream would take the last of waitress'
        # 4 threads, and is refused before its first byte.
        clients = [self.open("/plone/@@progress", source=f"127.0.0.{n}") for n in (1, 2, 3)]
        for client in clients:
            client.read_until(b"step 1 of 5\n")
        fourth = self.open("/plone/@@progress", source="127.0.0.4")
        status, headers = fourth.head()
        self.assertEqual(status, 503)
        self.assertEqual(headers["retry-after"], "10")
        page = self.open("/plone/@@slow-report")
        self.assertEqual(page.head()[0], 200)

    def test_csv_export_streams_every_document(self):
        client = self.open("/plone/@@documents-csv", auth=OWNER)
        text = client.body().decode()
        _, headers = client.head()
        self.assertEqual(headers["content-type"], "text/csv; charset=utf-8")
        self.assertEqual(headers["content-disposition"], 'attachment; filename="documents.csv"')
        rows = list(csv.reader(io.StringIO(text)))
        self.assertEqual(rows[0], ["path", "title", "modified"])
        self.assertEqual(len(rows), DOCUMENTS + 1)
        self.assertEqual(rows[1][:2], ["/plone/doc-00", "document 00"])

    def test_csv_export_needs_a_manager(self):
        self.assertIn(self.open("/plone/@@documents-csv").head()[0], (302, 401))

    def authenticator(self):
        """The _authenticator of the job's form, as a browser finds it."""
        client = self.open("/plone/@@retitle-documents", auth=OWNER)
        self.assertEqual(client.head()[0], 200)
        body = client.body()
        match = re.search(rb'name="_authenticator" value="([^"]+)"', body)
        self.assertIsNotNone(match, body[:2000])
        return match.group(1).decode()

    def post_job(self, form):
        return self.open("/plone/@@retitle-documents", method="POST", auth=OWNER, form=form)

    def test_batch_job_shows_a_form_on_get_and_writes_nothing(self):
        self.assertTrue(self.authenticator())
        self.assertEqual(self.titles(), [f"document {n:02d}" for n in range(DOCUMENTS)])

    def test_batch_job_without_a_valid_authenticator_writes_nothing(self):
        for form in ({}, {"_authenticator": "forged"}):
            with self.subTest(form=form):
                client = self.post_job(form)
                # Refused at its first commit: the stream fails (no clean
                # end of the body), and nothing was written.
                with self.assertRaisesRegex(AssertionError, "server closed before the body"):
                    client.body()
                self.assertTrue(wait_for_streams_to_end())
                self.assertEqual(self.titles(), [f"document {n:02d}" for n in range(DOCUMENTS)])

    def test_batch_job_that_finishes_commits_everything(self):
        client = self.post_job({"_authenticator": self.authenticator()})
        client.read_until(b"done: 40 documents\n")
        self.assertTrue(wait_for_streams_to_end())
        self.assertEqual(self.titles(), [f"DOCUMENT {n:02d}" for n in range(DOCUMENTS)])

    def test_batch_job_keeps_the_committed_batches_when_the_client_leaves(self):
        self.addCleanup(setattr, views, "BATCH_SIZE", views.BATCH_SIZE)
        views.BATCH_SIZE = 10
        client = self.post_job({"_authenticator": self.authenticator()})
        client.read_until(b"20 /plone/doc-19\n")
        client.close()
        self.assertTrue(wait_for_streams_to_end())
        titles = self.titles()
        self.assertEqual(titles[:20], [f"DOCUMENT {n:02d}" for n in range(20)])
        self.assertEqual(titles[30:], [f"document {n:02d}" for n in range(30, 40)])
        # The catalog followed the commits, not the aborted rest.
        site = committed_site(self)
        indexed = {b.getId: b.Title for b in site.portal_catalog(portal_type="Document")}
        self.assertEqual(indexed, {f"doc-{n:02d}": site[f"doc-{n:02d}"].title for n in range(40)})
