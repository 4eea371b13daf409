"""The README's example of a test of a streaming view."""

# example: testing-test
import unittest

from collective.streamguard.testing import end_reasons
from collective.streamguard.testing import open_stream
from collective.streamguard.testing import wait_for_streams_to_end
from streamguard_newcomer.testing import NEWCOMER_WAITRESS_TESTING


class TestProgress(unittest.TestCase):
    layer = NEWCOMER_WAITRESS_TESTING

    def test_progress_stops_when_the_browser_leaves(self):
        before = end_reasons()["client gone"]
        client = open_stream(self.layer, "/plone/@@progress")
        self.assertEqual(client.head()[0], 200)
        client.read_until(b"step 1 of 5\n")  # read some,
        client.close()  # then leave midway
        # The stream ended and its cleanups ran (in the server's thread).
        self.assertTrue(wait_for_streams_to_end())
        self.assertEqual(end_reasons()["client gone"], before + 1)


# end example
