"""A producer's own ZODB connection and transaction, and a joined SQL session.

On a real Plone site served by a real waitress: what the producer writes is
committed when it finishes and aborted when the client leaves, batch commits
stay, the catalog follows, and no connection or transaction is left behind.
"""

import os
import sqlite3
import tempfile

import transaction

from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import read_until
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import StreamingTestCase

PATH = "/plone/@@streamguard-test-zodb"


def open_connections(db):
    return [info for info in db.connectionDebugInfo() if info["opened"]]


class TestOwnZODBConnection(StreamingTestCase):
    def setUp(self):
        super().setUp()
        self.db = self.layer["zodbDB"]
        baseline = len(open_connections(self.db))
        # Registered first, so it runs after the cleanups that close the
        # test's own connections.
        self.addCleanup(
            lambda: self.assertTrue(
                wait_for(lambda: len(open_connections(self.db)) == baseline),
                open_connections(self.db),
            )
        )

    def test_producer_runs_as_the_user_in_the_site_with_its_own_connection(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=write", auth=True, path=PATH)
        read_until(sock, b"marked")
        (context,) = views.events("context", tag=tag)
        self.assertEqual(context["user"], "admin")
        self.assertTrue(context["site_is_set"])
        self.assertTrue(context["jar_is_own"])
        self.assertEqual(context["context_path"], "/plone")
        views.gate(tag).set()
        sock.body()
        self.assert_cleaned_up_once(tag, "finished")

    def test_finished_producer_commits(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=write", auth=True, path=PATH)
        read_until(sock, b"marked")
        views.gate(tag).set()
        sock.body()
        self.assert_cleaned_up_once(tag, "finished")
        self.assertEqual(getattr(self.site(), "_streamguard_mark", None), tag)

    def test_a_conflict_in_the_final_commit_aborts_and_the_client_can_tell(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=write", auth=True, path=PATH)
        read_until(sock, b"marked")
        # Meanwhile another connection (another thread, another ZEO client)
        # changes the same object and commits first.
        tm = transaction.TransactionManager()
        connection = self.db.open(transaction_manager=tm)
        try:
            connection.root()["Application"]["plone"]._streamguard_mark = "theirs"
            tm.commit()
        finally:
            connection.close()
        views.gate(tag).set()
        # The producer's final commit conflicts: aborted, and the stream
        # ends as failed, without the body's clean end.
        with self.assertRaisesRegex(AssertionError, "server closed before the body ended"):
            sock.body()
        self.assert_cleaned_up_once(tag, "error")
        self.assertEqual(self.site()._streamguard_mark, "theirs")

    def test_client_leaving_aborts(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=write", auth=True, path=PATH)
        read_until(sock, b"marked")
        sock.close()
        self.assert_cleaned_up_once(tag, "client gone")
        self.assertNotEqual(getattr(self.site(), "_streamguard_mark", None), tag)

    def test_batch_commits_stay_and_the_rest_is_aborted_with_the_catalog(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=batch&count=25", auth=True, path=PATH)
        read_until(sock, b"committed 20")
        sock.close()
        self.assert_cleaned_up_once(tag, "client gone")
        site = self.site()
        created = sorted(i for i in site.objectIds() if i.startswith(tag))
        self.assertEqual(len(created), 20)
        # The catalog's indexing queue joined the stream's transaction, not
        # the thread's idle default one.
        found = site.portal_catalog.unrestrictedSearchResults(portal_type="Document")
        self.assertEqual(len([b for b in found if b.getId.startswith(tag)]), 20)


class TestSQLAlchemySession(StreamingTestCase):
    def setUp(self):
        super().setUp()
        directory = tempfile.mkdtemp()
        self.path = os.path.join(directory, "rows.sqlite")
        with sqlite3.connect(self.path) as db:
            db.execute("CREATE TABLE rows (tag TEXT, n INTEGER)")
        views.SQL["url"] = f"sqlite:///{self.path}"
        self.addCleanup(views.SQL.clear)

    def rows(self, tag):
        with sqlite3.connect(self.path, timeout=1) as db:
            return db.execute("SELECT n FROM rows WHERE tag = ?", (tag,)).fetchall()

    def test_client_leaving_rolls_back_and_leaves_no_open_transaction(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=sql", auth=True, path=PATH)
        read_until(sock, b"inserted")
        sock.close()
        self.assert_cleaned_up_once(tag, "client gone")
        self.assertEqual(self.rows(tag), [])
        # No transaction is left open on the file: a writer gets the lock at
        # once (SQLite would say "database is locked" after the timeout).
        with sqlite3.connect(self.path, timeout=0.5) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO rows VALUES ('probe', 1)")

    def test_finished_producer_commits_the_rows(self):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=sql", auth=True, path=PATH)
        read_until(sock, b"inserted")
        views.gate(tag).set()
        sock.body()
        self.assert_cleaned_up_once(tag, "finished")
        self.assertEqual(self.rows(tag), [(0,), (1,), (2,)])
