"""The rooms of the package docstring hold, checked by package: the core
(its top-level modules, ``parking/``, ``logs/``) is plain Python (importing
it loads no Zope, Plone or ZODB module, and no server module: those are
imported lazily), ``waitress/`` loads waitress and no Zope, and the Zope
modules load nothing of Plone."""

import json
import os
import pkgutil
import subprocess
import sys
import unittest

import collective.streamguard

PACKAGE = collective.streamguard.__path__[0]
SRC = os.path.dirname(os.path.dirname(PACKAGE))
#: The core's rooms: everything in them is plain Python.
CORE_PACKAGES = ("parking", "logs")
#: The core's modules at the top of the package.
CORE = (
    "connection",
    "probes",
    "watcher",
    "guard",
    "streams",
    "shutdown",
    "hub",
    "jobs",
    "workers",
)
#: All of waitress' knowledge: may import waitress, nothing of Zope.
WAITRESS_PACKAGE = "waitress"
ZOPE = (
    "interfaces",
    "permissions",
    "streaming",
    "parkpolicy",
    "zodb",
    "deployment",
    "worker",
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
        if name.startswith(("tests", "_")) or name.split(".")[-1].startswith("_"):
            continue
        if not info.ispkg:
            names.add(name)
    return names


def in_package(names, package):
    return tuple(name for name in names if name.startswith(package + "."))


class ImportTests(unittest.TestCase):
    def test_every_module_is_in_one_room(self):
        modules = package_modules()
        core = set(CORE).union(*(in_package(modules, p) for p in CORE_PACKAGES))
        waitress = set(in_package(modules, WAITRESS_PACKAGE))
        self.assertEqual(modules, core | waitress | set(ZOPE + PLONE + TESTING))
        self.assertEqual(len(modules), len(core) + len(waitress) + len(ZOPE + PLONE + TESTING))

    def core(self):
        modules = package_modules()
        return CORE + sum((in_package(modules, p) for p in CORE_PACKAGES), ())

    def assert_core_only(self, modules):
        self.assertIn("collective.streamguard.probes", modules)
        for name in modules:
            self.assertNotIn(name.split(".")[0], ZOPE_AND_ZODB + ("plone",) + SERVERS, name)

    def test_core_imports_no_zope_plone_or_server_module(self):
        self.assert_core_only(loaded_by_import(self.core()))

    def test_core_needs_only_the_standard_library(self):
        # -S: no site-packages at all, only the package's own src.
        self.assert_core_only(loaded_by_import(self.core(), "-S"))

    def test_the_waitress_room_loads_waitress_and_no_zope(self):
        modules = loaded_by_import(in_package(package_modules(), WAITRESS_PACKAGE))
        self.assertIn("waitress.task", modules)
        self.assertFalse([m for m in modules if m.split(".")[0] in ZOPE_AND_ZODB + ("plone",)])

    def test_package_imports_only_the_core(self):
        modules = loaded_by_import(())
        self.assertFalse([m for m in modules if m.split(".")[0] in ZOPE_AND_ZODB + ("plone",)])
        self.assertNotIn("waitress", [m.split(".")[0] for m in modules])

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
