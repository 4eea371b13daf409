"""The real-waitress test layer: a Plone site served over real sockets."""

import unittest

from collective.streamguard.testing import STREAMGUARD_WAITRESS_TESTING
from collective.streamguard.testing import WaitressServer
from collective.streamguard.tests.helpers import http_request


class TestWaitressLayer(unittest.TestCase):
    layer = STREAMGUARD_WAITRESS_TESTING

    def test_server_runs_with_the_chosen_waitress_options(self):
        adj = self.layer["server"].adj
        self.assertEqual(adj.threads, 4)
        self.assertEqual(adj.channel_request_lookahead, 0)
        self.assertFalse(adj.expose_tracebacks)

    def test_plone_site_answers_over_a_real_socket(self):
        status, _, body = http_request((self.layer["host"], self.layer["port"]), "/plone")
        self.assertEqual(status, 200)
        self.assertIn(b"Plone site", body)

    def test_options_given_to_a_layer_reach_waitress(self):
        layer = WaitressServer(name="lookahead", threads=2, channel_request_lookahead=1)
        self.assertEqual(layer.waitress_options, {"threads": 2, "channel_request_lookahead": 1})
