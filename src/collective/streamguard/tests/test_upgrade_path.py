"""A site that installed the add-on long ago keeps its settings through every
upgrade step, on the Plone release the suite runs on (6.1 or 6.2).

A Plone 6.1 site moved to 6.2 runs the add-on's upgrade steps on 6.2's
GenericSetup and plone.app.registry: `make test` runs this on 6.2, `make test
PLONE=6.1` on 6.1, so both ends of that move are covered.  What the add-on
stores is only registry records, a browser layer and a rolemap setting; a full
Plone upgrade (plone.app.upgrade) is not run here.
"""

import unittest

from plone.browserlayer.utils import registered_layers
from plone.registry.interfaces import IRegistry
from zope.component import getUtility

from collective.streamguard.interfaces import IStreamGuardLayer
from collective.streamguard.interfaces import IStreamGuardSettings
from collective.streamguard.testing import STREAMGUARD_INTEGRATION_TESTING

PROFILE = "collective.streamguard:default"
PREFIX = "collective.streamguard."
# The records each upgrade step adds: a site at 1000 has none of them.
ADDED_AFTER_1000 = ("max_streams_per_user", "park_streams", "max_parked_streams")
# Every other setting, changed from its default as a site's manager would.
CHANGED = {
    "max_streams": 3,
    "max_duration": 900,
    "heartbeat_interval": 20,
    "end_marker": "-- the end --",
    "log_files": ["event", "access"],
}


class TestUpgradePath(unittest.TestCase):
    layer = STREAMGUARD_INTEGRATION_TESTING

    def setUp(self):
        self.portal = self.layer["portal"]
        self.setup = self.portal.portal_setup
        self.registry = getUtility(IRegistry, context=self.portal)

    def test_site_installed_at_1000_keeps_every_setting_through_all_upgrades(self):
        # Every setting of today is either changed below or added by a step.
        self.assertEqual(set(IStreamGuardSettings.names()), set(CHANGED) | set(ADDED_AFTER_1000))
        for name in ADDED_AFTER_1000:
            del self.registry.records[PREFIX + name]
        for name, value in CHANGED.items():
            self.assertNotEqual(IStreamGuardSettings[name].default, value, name)
            self.registry[PREFIX + name] = value
        self.setup.setLastVersionForProfile(PROFILE, "1000")

        steps = self.setup.listUpgrades(PROFILE)
        self.assertEqual([step["dest"] for step in steps], [("1001",), ("1002",)])
        self.setup.upgradeProfile(PROFILE)

        self.assertEqual(self.setup.getLastVersionForProfile(PROFILE), ("1002",))
        self.assertEqual(self.setup.listUpgrades(PROFILE), [])
        for name, value in CHANGED.items():
            self.assertEqual(self.registry[PREFIX + name], value, name)
        for name in ADDED_AFTER_1000:
            self.assertEqual(self.registry[PREFIX + name], IStreamGuardSettings[name].default, name)
        self.assertIn(IStreamGuardLayer, registered_layers())
