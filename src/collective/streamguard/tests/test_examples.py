"""README.rst's example views: the code there is this package's
``tests/examples.py``, and it works on a real Plone site and waitress."""

import csv
import io
import os
import re
import unittest

import transaction
from plone.app.testing import SITE_OWNER_NAME
from plone.app.testing import SITE_OWNER_PASSWORD

from collective.streamguard.streams import live_streams
from collective.streamguard.tests import examples
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import StreamingTestCase

OWNER = (SITE_OWNER_NAME, SITE_OWNER_PASSWORD)
README = os.path.join(os.path.dirname(__file__), *[os.pardir] * 4, "README.rst")


def readme_examples():
    """The code blocks of README.rst that start with ``# example: NAME``."""
    with open(README) as f:
        text = f.read()
    blocks = {}
    for match in re.finditer(r"::\n\n((?:    .*\n|\n)+)", text):
        code = "\n".join(line[4:] for line in match.group(1).splitlines()).strip()
        first = code.splitlines()[0]
        if first.startswith("# example: "):
            blocks[first[len("# example: ") :]] = code
    return blocks


def dechunk(body):
    """The payload of an HTTP/1.1 chunked body."""
    payload = b""
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return payload
        payload, body = payload + body[:size], body[size + 2 :]


def module_examples():
    with open(examples.__file__) as f:
        text = f.read()
    return {
        name: f"# example: {name}\n{body}".strip()
        for name, body in re.findall(r"# example: (\S+)\n(.*?)# end example", text, re.S)
    }


class TestReadmeShowsTheTestedCode(unittest.TestCase):
    def test_readme_examples_are_the_tested_ones(self):
        in_readme, in_module = readme_examples(), module_examples()
        self.assertEqual(sorted(in_readme), ["batch-job", "csv-export"])
        self.assertEqual(in_readme, in_module)


class TestExampleViews(StreamingTestCase):
    def setUp(self):
        super().setUp()
        portal = self.layer["portal"]
        from plone.app.testing import TEST_USER_ID
        from plone.app.testing import setRoles

        setRoles(portal, TEST_USER_ID, ["Manager"])
        for n in range(40):
            portal.invokeFactory("Document", f"doc-{n:02d}", title=f"document {n:02d}")
        transaction.commit()

    def site(self):
        db = self.layer["zodbDB"]
        tm = transaction.TransactionManager()
        connection = db.open(transaction_manager=tm)
        self.addCleanup(connection.close)
        self.addCleanup(tm.abort)
        return connection.root()["Application"]["plone"]

    def test_csv_export_streams_every_document(self):
        sock = self.open("", auth=True, path="/plone/@@documents-csv")
        text = sock.body().decode()
        _, headers = sock.head()
        self.assertEqual(headers["content-type"], "text/csv; charset=utf-8")
        self.assertEqual(headers["content-disposition"], 'attachment; filename="documents.csv"')
        rows = list(csv.reader(io.StringIO(text)))
        self.assertEqual(rows[0], ["path", "title", "modified"])
        self.assertEqual(len(rows), 41)
        self.assertEqual(rows[1][:2], ["/plone/doc-00", "document 00"])

    def test_csv_export_needs_a_manager(self):
        status, _, _ = self.get("/plone/@@documents-csv")
        self.assertIn(status, (302, 401))

    def authenticator(self):
        """The _authenticator of the job's form, as a browser finds it."""
        status, _, body = self.get_as_owner("/plone/@@retitle-documents")
        self.assertEqual(status, 200)
        match = re.search(rb'name="_authenticator" value="([^"]+)"', body)
        self.assertIsNotNone(match, body[:2000])
        return match.group(1).decode()

    def get_as_owner(self, path):
        sock = self.open("", auth=True, path=path)
        status, _ = sock.head()
        return status, None, sock.body()

    def post_job(self, form):
        return self.connect().request(
            "/plone/@@retitle-documents", method="POST", auth=OWNER, form=form
        )

    def titles(self):
        return [self.site()[f"doc-{n:02d}"].title for n in range(40)]

    def test_batch_job_shows_a_form_with_the_authenticator_on_get(self):
        self.assertTrue(self.authenticator())
        self.assertEqual(self.titles(), [f"document {n:02d}" for n in range(40)])

    def test_batch_job_without_the_authenticator_writes_nothing(self):
        for form in ({}, {"_authenticator": "forged"}):
            with self.subTest(form=form):
                sock = self.post_job(form)
                # Refused at the first commit: the client sees a failed
                # stream (no clean end), and nothing was written.
                with self.assertRaisesRegex(AssertionError, "server closed before the body"):
                    sock.body()
                self.assertTrue(wait_for(lambda: not live_streams.live()))
                self.assertEqual(self.titles(), [f"document {n:02d}" for n in range(40)])
        # A GET that streams (the test view that does not declare itself
        # safe) is refused the same way.
        sock = self.open(
            "tag=get&mode=batch&count=12&csrf=check",
            auth=True,
            path="/plone/@@streamguard-test-zodb",
        )
        with self.assertRaisesRegex(AssertionError, "server closed before the body"):
            sock.body()
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        self.assertNotIn("get-0", self.site().objectIds())

    def test_a_stream_with_the_token_in_its_header_may_write_on_get(self):
        token = self.authenticator()
        sock = self.open(
            "tag=tok&mode=batch&count=10&csrf=check",
            auth=True,
            path="/plone/@@streamguard-test-zodb",
            headers={"X-CSRF-TOKEN": token},
        )
        read_until(sock, b"committed 10\n")
        sock.close()
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        self.assertIn("tok-9", self.site().objectIds())

    def test_batch_job_keeps_the_committed_batches_when_the_client_leaves(self):
        self.addCleanup(setattr, examples, "BATCH_SIZE", examples.BATCH_SIZE)
        examples.BATCH_SIZE = 10
        sock = self.post_job({"_authenticator": self.authenticator()})
        read_until(sock, b"20 /plone/doc-19\n")
        sock.close()
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        titles = [self.site()[f"doc-{n:02d}"].title for n in range(40)]
        self.assertEqual(titles[:20], [f"DOCUMENT {n:02d}" for n in range(20)])
        self.assertEqual(titles[30:], [f"document {n:02d}" for n in range(30, 40)])
        # The catalog followed the commits, not the aborted rest.
        site = self.site()
        indexed = {b.getId: b.Title for b in site.portal_catalog(portal_type="Document")}
        self.assertEqual(indexed, {f"doc-{n:02d}": site[f"doc-{n:02d}"].title for n in range(40)})

    def test_batch_job_that_finishes_commits_everything(self):
        sock = self.post_job({"_authenticator": self.authenticator()})
        read_until(sock, b"done: 40 documents\n")
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        titles = {self.site()[f"doc-{n:02d}"].title for n in range(40)}
        self.assertEqual(titles, {f"DOCUMENT {n:02d}" for n in range(40)})
