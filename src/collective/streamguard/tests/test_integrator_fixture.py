"""The fixture an integrator bases a layer on: the add-on and nothing else;
and a ``zodb=True`` producer under ``IntegrationTesting`` sees what is
committed, not the test's uncommitted content."""

import unittest

from plone.app.testing import TEST_USER_ID
from plone.app.testing import setRoles
from plone.protect.interfaces import IDisableCSRFProtection
from zope.interface import alsoProvides

from collective.streamguard import stream_response
from collective.streamguard.testing import STREAMGUARD_INTEGRATION_TESTING


class TestIntegratorFixture(unittest.TestCase):
    layer = STREAMGUARD_INTEGRATION_TESTING

    def setUp(self):
        self.portal = self.layer["portal"]
        self.request = self.layer["request"]
        setRoles(self.portal, TEST_USER_ID, ["Manager"])

    def test_the_add_on_is_installed_without_its_own_test_views(self):
        self.assertIsNotNone(self.portal.restrictedTraverse("@@stream-status", None))
        for name in ("documents-csv", "retitle-documents", "streamguard-test-stream"):
            self.assertIsNone(self.portal.restrictedTraverse(f"@@{name}", None), name)

    def test_a_zodb_producer_sees_what_is_committed_not_the_tests_changes(self):
        self.portal.invokeFactory("Document", "uncommitted", title="not committed")
        # The test itself writes on this request: nothing to do with CSRF.
        alsoProvides(self.request, IDisableCSRFProtection)

        def producer(guard):
            site = guard.zodb.site
            paths = [brain.getPath() for brain in site.portal_catalog(portal_type="Document")]
            yield f"catalog: {paths}; site: {'uncommitted' in site.objectIds()}\n"

        body = stream_response(self.request, producer, zodb=True, context=self.portal)
        # The in-process way: iterate the body here (no server).
        self.assertEqual(b"".join(body), b"catalog: []; site: False\n")
        # The test's own catalog work is still queued for the test, and
        # found by its own search.
        found = [b.getId for b in self.portal.portal_catalog(portal_type="Document")]
        self.assertEqual(found, ["uncommitted"])
