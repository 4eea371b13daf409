"""The suite runs on the Plone release it was asked for, with that release's
Zope, and the add-on's one Plone condition holds there.

Plone 6.1 runs on Zope 5, Plone 6.2 on Zope 6.  The add-on's code is the same
on both: what tells them apart in the add-on is one ZCML condition,
``have plone-60`` in configure.zcml, which Products.CMFPlone's meta.zcml
provides on 6.1 and 6.2 alike (6.2 adds ``plone-62``).  ``make test PLONE=6.1``
sets STREAMGUARD_PLONE, so a run in the wrong virtualenv fails here.
"""

import os
import unittest
from importlib.metadata import version

from zope.component import queryUtility

from collective.streamguard.testing import STREAMGUARD_INTEGRATION_TESTING

#: The Zope major release of each supported Plone release.
ZOPE_OF_PLONE = {"6.1": 5, "6.2": 6}


def release(distribution):
    return ".".join(version(distribution).split(".")[:2])


class TestReleases(unittest.TestCase):
    layer = STREAMGUARD_INTEGRATION_TESTING

    def test_plone_is_a_supported_release_on_its_own_zope(self):
        plone = release("Products.CMFPlone")
        self.assertIn(plone, ZOPE_OF_PLONE)
        self.assertEqual(int(version("Zope").split(".")[0]), ZOPE_OF_PLONE[plone])

    def test_plone_is_the_release_make_test_asked_for(self):
        # Set by the Makefile (`make test PLONE=...`); a plain zope-testrunner
        # or bin/test run checks the installed release only (test above).
        wanted = os.environ.get("STREAMGUARD_PLONE", release("Products.CMFPlone"))
        self.assertEqual(release("Products.CMFPlone"), wanted)

    def test_the_plone_condition_of_configure_zcml_holds_and_tells_the_releases_apart(self):
        context = self.layer["configurationContext"]
        self.assertTrue(context.hasFeature("plone-60"))
        self.assertTrue(context.hasFeature("plone-61"))
        self.assertEqual(context.hasFeature("plone-62"), release("Products.CMFPlone") == "6.2")

    def test_plone_zcml_was_loaded(self):
        # plone.zcml, included under that condition, registers the settings
        # provider that reads the site's registry.
        from collective.streamguard.interfaces import IStreamSettingsProvider
        from collective.streamguard.settings import RegistrySettingsProvider

        self.assertIsInstance(queryUtility(IStreamSettingsProvider), RegistrySettingsProvider)
