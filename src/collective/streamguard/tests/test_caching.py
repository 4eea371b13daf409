"""Streams stay streams in a site with plone.app.caching's rules switched on.

The ``Plone`` distribution brings plone.app.caching; its profiles map
published objects to rules whose operations set Cache-Control, ETag and
Last-Modified, answer 304 and keep pages in a RAM cache.  None of that may
touch a stream: its headers are the add-on's, its body is sent while the
producer still works.
"""

import transaction
from plone.app.testing import applyProfile
from plone.registry.interfaces import IRegistry
from zope.component import getUtility

from collective.streamguard.testing import STREAMGUARD_DISTRIBUTION_WAITRESS_TESTING
from collective.streamguard.tests import views
from collective.streamguard.tests.streamcases import StreamingTestCase

CACHE_SETTINGS = "plone.caching.interfaces.ICacheSettings"
TEMPLATE_RULES = "plone.app.caching.interfaces.IPloneCacheSettings.templateRulesetMapping"


class TestStreamsUnderCachingRules(StreamingTestCase):
    layer = STREAMGUARD_DISTRIBUTION_WAITRESS_TESTING

    def setUp(self):
        super().setUp()
        portal = self.layer["portal"]
        # The rules for a site behind a caching proxy, switched on; the
        # layer's demo storage forgets them after the test.
        applyProfile(portal, "plone.app.caching:with-caching-proxy")
        self.registry = getUtility(IRegistry, context=portal)
        self.registry[f"{CACHE_SETTINGS}.enabled"] = True
        transaction.commit()

    def assert_streams_uncached(self, rule=None):
        tag = self.tag()
        sock = self.open(f"tag={tag}&mode=gated")
        head = sock.read_until(f"first line of {tag}".encode())
        # The first line arrived while the producer waits at its gate.
        self.assertFalse(views.events("cleanup", tag=tag))
        status, headers = sock.head()
        self.assertEqual(status, 200)
        self.assertEqual(headers["transfer-encoding"], "chunked", head)
        self.assertEqual(headers["cache-control"], "no-store", head)
        # plone.caching names the rule it found before the view ran; the
        # rule's operation never runs: it would run in the transform chain,
        # which stream_response switches off.
        self.assertEqual(headers.get("x-cache-rule"), rule, head)
        for name in ("content-length", "etag", "last-modified", "expires", "x-cache-operation"):
            self.assertNotIn(name, headers, head)
        views.gate(tag).set()
        self.assertIn(b"after the gate", sock.body())
        self.assert_cleaned_up_once(tag, "finished")

    def test_caching_rules_are_on_for_ordinary_responses(self):
        # A resource of the add-on falls under plone.resource (strong
        # caching): the rules do apply in this site.
        status, headers, _ = self.get("/plone/++resource++collective.streamguard/viewer.css")
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("x-cache-rule"), "plone.resource")
        self.assertEqual(headers.get("x-cache-operation"), "plone.app.caching.strongCaching")
        self.assertIn("max-age=", headers["cache-control"])

    def test_stream_streams_with_caching_on(self):
        self.assert_streams_uncached()

    def test_stream_mapped_to_a_caching_rule_still_streams_uncached(self):
        # An integrator maps the view to a rule with ETags and the RAM cache.
        self.registry[TEMPLATE_RULES] = {"streamguard-test-stream": "plone.content.itemView"}
        transaction.commit()
        self.assert_streams_uncached(rule="plone.content.itemView")
        # Twice: a second request must not be answered from the RAM cache.
        self.assert_streams_uncached(rule="plone.content.itemView")
