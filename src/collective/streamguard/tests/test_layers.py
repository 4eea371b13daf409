"""The layers of the package docstring hold: the core is plain Python
(importing it loads no Zope, Plone or ZODB module, and no server module:
those are imported lazily), and the Zope modules load nothing of Plone."""

import json
import os
import pkgutil
import subprocess
import sys
import unittest

import collective.streamguard

PACKAGE = collective.streamguard.__path__[0]
SRC = os.path.dirname(os.path.dirname(PACKAGE))
CORE = (
    "connection",
    "probes",
    "watcher",
    "guard",
    "streams",
    "shutdown",
    "waitress_output",
    "parked",
    "hub",
    "waitress_park",
    "inotify",
    "follow",
    "utf8",
    "logstream",
    "logs",
)
ZOPE = (
    "interfaces",
    "permissions",
    "streaming",
    "parking",
    "zodb",
    "deployment",
    "browser.stream_log",
    "browser.status",
)
PLONE = (
    "settings",
    "setuphandlers",
    "csrf",
    "browser.controlpanel",
    "browser.viewer",
    "restapi",
)
#: Core modules that import their server's own modules (guarded).
GENERIC_CORE = tuple(name for name in CORE if name not in ("waitress_output", "waitress_park"))
#: Test layers, not part of the product's layers.
TESTING = ("testing",)
ZOPE_AND_ZODB = ("zope", "Products", "ZPublisher", "Zope2", "transaction", "ZODB")
SERVERS = ("asyncore", "asynchat", "uwsgi", "waitress", "gunicorn")
SCRIPT = """
import importlib, json, sys
before = set(sys.modules)
for name in sys.argv[1:]:
    importlib.import_module("collective.streamguard." + name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def loaded_by_import(modules, *flags):
    """The modules a fresh interpreter loads to import ``modules``."""
    env = dict(os.environ, PYTHONPATH=SRC)
    result = subprocess.run(
        [sys.executable, *flags, "-c", SCRIPT, *modules],
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


def package_modules():
    names = set()
    prefix = "collective.streamguard."
    for info in pkgutil.walk_packages([PACKAGE], prefix):
        name = info.name[len(prefix) :]
        if name.startswith(("tests", "_")) or info.ispkg:
            continue
        names.add(name)
    return names


class LayerTests(unittest.TestCase):
    def test_every_module_has_a_layer(self):
        self.assertEqual(package_modules(), set(CORE + ZOPE + PLONE + TESTING))

    def assert_core_only(self, modules):
        self.assertIn("collective.streamguard.probes", modules)
        for name in modules:
            self.assertNotIn(name.split(".")[0], ZOPE_AND_ZODB + ("plone",) + SERVERS, name)

    def test_core_imports_no_zope_plone_or_server_module(self):
        self.assert_core_only(loaded_by_import(GENERIC_CORE))

    def test_core_needs_only_the_standard_library(self):
        # -S: no site-packages at all, only the package's own src.
        self.assert_core_only(loaded_by_import(CORE, "-S"))

    def test_waitress_output_loads_waitress_and_no_zope(self):
        # Imported by the guard only once a large chunk meets waitress.
        modules = loaded_by_import(("waitress_output",))
        self.assertIn("waitress.task", modules)
        self.assertFalse([m for m in modules if m.split(".")[0] in ZOPE_AND_ZODB + ("plone",)])

    def test_package_imports_only_the_core(self):
        modules = loaded_by_import(())
        self.assertFalse([m for m in modules if m.split(".")[0] in ZOPE_AND_ZODB + ("plone",)])

    def test_zope_modules_load_nothing_of_plone(self):
        modules = loaded_by_import(ZOPE)
        self.assertIn("collective.streamguard.streaming", modules)
        self.assertFalse([m for m in modules if m.split(".")[0] == "plone"])

    def test_stream_response_comes_from_the_package_root_when_asked_for(self):
        import collective.streamguard.streaming

        self.assertIs(
            collective.streamguard.stream_response,
            collective.streamguard.streaming.stream_response,
        )
        self.assertIn("stream_response", collective.streamguard.__all__)
        with self.assertRaisesRegex(AttributeError, "no attribute 'nothing_here'"):
            collective.streamguard.nothing_here  # noqa: B018
