"""The core is plain Python: importing it loads no Zope, Plone or ZODB
module, and no server module either (they are imported lazily)."""

import json
import os
import subprocess
import sys
import unittest

import collective.streamguard

SRC = os.path.dirname(os.path.dirname(os.path.dirname(collective.streamguard.__file__)))
FORBIDDEN = ("zope", "Products", "plone", "ZPublisher", "Zope2", "transaction", "ZODB")
LAZY = ("asyncore", "asynchat", "uwsgi", "waitress", "gunicorn")
SCRIPT = """
import json, sys
before = set(sys.modules)
import collective.streamguard
import collective.streamguard.connection, collective.streamguard.probes
import collective.streamguard.watcher, collective.streamguard.guard
import collective.streamguard.registry, collective.streamguard.follow
import collective.streamguard.logstream
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def loaded_by_import(*flags):
    env = dict(os.environ, PYTHONPATH=SRC)
    result = subprocess.run(
        [sys.executable, *flags, "-c", SCRIPT],
        env=env,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


class ImportTests(unittest.TestCase):
    def assert_clean(self, modules):
        self.assertIn("collective.streamguard.probes", modules)
        for name in modules:
            self.assertNotIn(name.split(".")[0], FORBIDDEN + LAZY, name)

    def test_core_imports_no_zope_plone_or_server_module(self):
        self.assert_clean(loaded_by_import())

    def test_core_needs_only_the_standard_library(self):
        # -S: no site-packages at all, only the package's own src.
        self.assert_clean(loaded_by_import("-S"))
