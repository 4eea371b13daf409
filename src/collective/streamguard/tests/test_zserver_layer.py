"""The real-ZServer test layer: what runs, and what it leaves alone."""

import os
import string
import sys
import warnings

from collective.streamguard.testing import zserver_directory
from collective.streamguard.tests.zservercases import ZServerTestCase

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import asynchat


class TestZServerLayer(ZServerTestCase):
    def test_the_server_is_zserver_402_from_its_own_directory(self):
        import ZServer
        from ZServer.HTTPServer import zhttp_server
        from ZServer.Zope2.Startup import config

        self.assertIsInstance(self.server, zhttp_server)
        self.assertEqual(self.server.server_port, self.layer["port"])
        self.assertEqual(config.ZSERVER_THREADS, 2)
        directory = os.path.realpath(zserver_directory())
        self.assertTrue(os.path.realpath(ZServer.__file__).startswith(directory + os.sep))
        self.assertTrue(os.path.isdir(os.path.join(directory, "ZServer-4.0.2.dist-info")))

    def test_only_the_zserver_package_comes_from_there(self):
        # The wheel's top-level webdav, Lifetime and Signals stay out: the
        # directory is not on sys.path, and webdav is Zope 6's own.
        import webdav

        directory = os.path.realpath(zserver_directory())
        self.assertNotIn(directory, [os.path.realpath(p) for p in sys.path if p])
        self.assertFalse(os.path.realpath(webdav.__file__).startswith(directory))
        self.assertNotIn("Lifetime", sys.modules)
        self.assertNotIn("Signals", sys.modules)

    def test_the_standard_library_is_left_alone(self):
        # Python 2's string functions and asynchat.fifo exist only for
        # ZServer's own modules.
        self.assertFalse(hasattr(string, "split"))
        self.assertFalse(hasattr(asynchat, "fifo"))
        from ZServer.medusa import http_server

        self.assertTrue(hasattr(http_server.string, "split"))

    def test_a_page_is_served_by_zserver(self):
        client, held = self.hold()
        self.release(held)
        status, headers = client.head()
        self.assertEqual(status, 200)
        self.assertIn("ZServer", headers["server"])
        self.assertEqual(client.read_until(b"released: gate\n"), b"released: gate\n")
