"""Test bases for streams on a real Plone site served by a real waitress.

Clients are ``helpers.HTTPClient``: the tests read a response while it is
still being produced, and leave with a FIN or a reset.
"""

import json
import os
import shutil
import tempfile
import unittest
import uuid

import transaction
from App.config import getConfiguration
from plone.app.testing import SITE_OWNER_NAME
from plone.app.testing import SITE_OWNER_PASSWORD
from plone.registry.interfaces import IRegistry
from zope.component import getUtility

from collective.streamguard.streams import live_streams
from collective.streamguard.testing import TEST_VIEWS_WAITRESS_TESTING
from collective.streamguard.testing import committed_site
from collective.streamguard.tests import views
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import http_request
from collective.streamguard.tests.helpers import wait_for

MARKER = "<<<<<EOFMARKER>>>>>"


def allow_log_directories(testcase, *directories):
    """As zope.conf's ``<product-config collective.streamguard>
    log-directories``, for the rest of ``testcase``."""
    config = getConfiguration()
    before = getattr(config, "product_config", None)
    product_config = dict(before or {})
    product_config["collective.streamguard"] = {"log-directories": " ".join(directories)}
    config.product_config = product_config
    testcase.addCleanup(setattr, config, "product_config", before)


def parked():
    """Live streams that are parked now (waiting without a thread)."""
    return [record for record in live_streams.live() if record.is_parked]


def ending_streams():
    """Live streams whose end has begun (their cleanups run now)."""
    return [record for record in live_streams.live() if record.guard.reason is not None]


class StreamingTestCase(unittest.TestCase):
    layer = TEST_VIEWS_WAITRESS_TESTING

    def setUp(self):
        self.sockets = []

    def tearDown(self):
        for sock in self.sockets:
            sock.close()
        # No test may leave a stream behind for the next one.
        self.assertTrue(wait_for(lambda: not live_streams.live(), 10), live_streams.live())

    def connect(self):
        """A buffered client connected to the layer's waitress."""
        client = HTTPClient((self.layer["host"], self.layer["port"]))
        self.sockets.append(client)
        return client

    def open(self, query, auth=False, path="/plone/@@streamguard-test-stream", headers=None):
        """A client that has sent ``GET path?query`` (as the site owner with ``auth``)."""
        credentials = (SITE_OWNER_NAME, SITE_OWNER_PASSWORD) if auth else None
        return self.connect().request(f"{path}?{query}", headers=headers, auth=credentials)

    def configure(self, **settings):
        """Set registry records of the add-on for the rest of the test."""
        registry = getUtility(IRegistry, context=self.layer["portal"])
        for name, value in settings.items():
            key = f"collective.streamguard.{name}"
            self.addCleanup(self.configure_now, {key: registry[key]})
            registry[key] = value
        transaction.commit()

    def configure_now(self, records):
        registry = getUtility(IRegistry, context=self.layer["portal"])
        for key, value in records.items():
            registry[key] = value
        transaction.commit()

    def tag(self):
        return uuid.uuid4().hex[:12]

    def http(self, path, method="GET", auth=None, headers=None, body=None):
        """(status, {lower-case name: value}, body) of one complete request
        to the layer's server; ``auth``: (user, password)."""
        address = (self.layer["host"], self.layer["port"])
        return http_request(address, path, method, auth=auth, headers=headers, body=body)

    def get(self, path):
        return self.http(path)

    def site(self):
        """The Plone site as a new ZODB connection sees it now (what is committed)."""
        return committed_site(self)

    def cleanups(self, tag):
        return views.events("cleanup", tag=tag)

    def assert_cleaned_up_once(self, tag, reason, timeout=10.0):
        self.assertTrue(wait_for(lambda: self.cleanups(tag), timeout), f"no cleanup for {tag}")
        # A second cleanup would come while the stream is still ending:
        # wait until no stream is between its end and its removal.
        self.assertTrue(wait_for(lambda: not ending_streams()), ending_streams())
        found = self.cleanups(tag)
        self.assertEqual([c["reason"] for c in found], [reason])


class LogTestCase(StreamingTestCase):
    """A log ``app`` in a temp dir, configured in the registry."""

    old_lines = "first old line\nsecond old line\n"

    def setUp(self):
        super().setUp()
        self.directory = tempfile.mkdtemp(prefix="streamguard-log-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "app.log")
        self.write(self.old_lines)
        allow_log_directories(self, self.directory)
        self.configure(log_files=[f"app|{self.path}"])

    def write(self, text, path=None, mode="a"):
        with open(path or self.path, mode, encoding="utf-8") as f:
            f.write(text)

    def follow(self, query="log=app", auth=True):
        """Start following; return the client and the response head (which
        comes at once, before the log has anything to send)."""
        sock = self.open(query, auth=auth, path="/plone/@@stream-log")
        head = sock.read_until(b"\r\n\r\n")
        return sock, head

    def status_json(self):
        status, _, body = self.get_as_manager("/plone/@@stream-status?format=json")
        self.assertEqual(status, 200)
        return json.loads(body)

    def get_as_manager(self, path):
        return self.http(path, auth=(SITE_OWNER_NAME, SITE_OWNER_PASSWORD))
