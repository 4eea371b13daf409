"""plone.protect's CSRF rule for the transactions of ``zodb=True`` streams,
on a real Plone site and waitress (the README's batch job, a POST form, is
tested in the newcomer package).

A stream writes in a transaction of its own that plone.protect never sees;
without a valid authenticator (or a view that declares the stream safe)
its commits are refused: aborted, and the stream fails.
"""

from plone.app.testing import SITE_OWNER_NAME
from plone.protect.authenticator import createToken
from plone.testing.zope import login
from plone.testing.zope import logout
from zope.component.hooks import getSite
from zope.component.hooks import setSite

from collective.streamguard.streams import live_streams
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.streamcases import StreamingTestCase

ZODB_PATH = "/plone/@@streamguard-test-zodb"


class TestStreamCSRF(StreamingTestCase):
    def token(self):
        """The site owner's authenticator, as @@authenticator makes it."""
        site = getSite()
        setSite(self.layer["portal"])
        login(self.layer["app"].acl_users, SITE_OWNER_NAME)
        try:
            return createToken()
        finally:
            logout()
            setSite(site)

    def object_ids(self):
        import transaction

        tm = transaction.TransactionManager()
        connection = self.layer["zodbDB"].open(transaction_manager=tm)
        try:
            return set(connection.root()["Application"]["plone"].objectIds())
        finally:
            tm.abort()
            connection.close()

    def test_a_writing_stream_of_a_get_without_a_token_writes_nothing(self):
        sock = self.open("tag=get&mode=batch&count=12&csrf=check", auth=True, path=ZODB_PATH)
        # Refused at its first commit: the client sees a failed stream.
        with self.assertRaisesRegex(AssertionError, "server closed before the body"):
            sock.body()
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        self.assertFalse({f"get-{n}" for n in range(12)} & self.object_ids())

    def test_a_stream_with_the_token_in_its_header_may_write_on_get(self):
        sock = self.open(
            "tag=tok&mode=batch&count=10&csrf=check",
            auth=True,
            path=ZODB_PATH,
            headers={"X-CSRF-TOKEN": self.token()},
        )
        sock.read_until(b"committed 10\n")
        sock.close()
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        self.assertIn("tok-9", self.object_ids())

    def test_a_view_that_declares_its_stream_safe_may_write(self):
        # The test view provides IDisableCSRFProtection unless csrf=check.
        sock = self.open("tag=safe&mode=batch&count=10", auth=True, path=ZODB_PATH)
        sock.read_until(b"committed 10\n")
        sock.close()
        self.assertTrue(wait_for(lambda: not live_streams.live()))
        self.assertIn("safe-9", self.object_ids())
