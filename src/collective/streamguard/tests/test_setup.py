"""The add-on installs into a Plone site and uninstalls without a trace."""

import unittest

from AccessControl import getSecurityManager
from AccessControl.Permission import pname
from plone.app.testing import TEST_USER_ID
from plone.app.testing import setRoles
from plone.base.utils import get_installer
from plone.browserlayer.utils import registered_layers
from plone.registry.interfaces import IRegistry
from zope.component import getUtility
from zope.i18nmessageid import Message

from collective.streamguard.interfaces import IStreamGuardLayer
from collective.streamguard.interfaces import IStreamGuardSettings
from collective.streamguard.permissions import VIEW_LOG_STREAMS
from collective.streamguard.testing import STREAMGUARD_INTEGRATION_TESTING

PREFIX = "collective.streamguard."


def our_records(portal):
    registry = getUtility(IRegistry, context=portal)
    return sorted(name for name in registry.records.keys() if name.startswith(PREFIX))


class TestInstall(unittest.TestCase):
    layer = STREAMGUARD_INTEGRATION_TESTING

    def setUp(self):
        self.portal = self.layer["portal"]
        self.installer = get_installer(self.portal, self.layer["request"])

    def test_product_is_installed(self):
        self.assertTrue(self.installer.is_product_installed("collective.streamguard"))

    def test_browser_layer_is_registered(self):
        self.assertIn(IStreamGuardLayer, registered_layers())

    def test_settings_records_have_their_defaults(self):
        registry = getUtility(IRegistry, context=self.portal)
        settings = registry.forInterface(IStreamGuardSettings, prefix="collective.streamguard")
        self.assertEqual(settings.max_streams, 0)
        self.assertEqual(settings.max_duration, 3600)
        self.assertEqual(settings.max_streams_per_user, 2)
        self.assertIs(settings.park_streams, True)
        self.assertEqual(settings.max_parked_streams, 0)
        self.assertEqual(settings.heartbeat_interval, 15)
        self.assertEqual(settings.end_marker, "<<<<<EOFMARKER>>>>>")
        self.assertEqual(settings.log_files, [])
        self.assertEqual(
            our_records(self.portal),
            sorted(PREFIX + name for name in IStreamGuardSettings.names()),
        )

    def test_view_log_streams_is_given_to_manager_only(self):
        roles = {
            r["name"] for r in self.portal.rolesOfPermission(VIEW_LOG_STREAMS) if r["selected"]
        }
        self.assertEqual(roles, {"Manager"})

    def test_manager_has_the_permission_and_a_member_has_not(self):
        setRoles(self.portal, TEST_USER_ID, ["Member"])
        self.assertFalse(getSecurityManager().checkPermission(VIEW_LOG_STREAMS, self.portal))
        setRoles(self.portal, TEST_USER_ID, ["Manager"])
        self.assertTrue(getSecurityManager().checkPermission(VIEW_LOG_STREAMS, self.portal))

    def test_addons_control_panel_lists_it_as_installed(self):
        setRoles(self.portal, TEST_USER_ID, ["Manager"])
        panel = self.portal.restrictedTraverse("@@prefs_install_products_form")
        installed = panel.get_installed()
        self.assertIn("collective.streamguard", [addon["id"] for addon in installed])
        addon = [a for a in installed if a["id"] == "collective.streamguard"][0]
        self.assertEqual(addon["install_profile_id"], "collective.streamguard:default")
        self.assertEqual(addon["uninstall_profile_id"], "collective.streamguard:uninstall")

    def test_configlet_titles_are_translatable_in_our_domain(self):
        titles = {
            action.getId(): action.title
            for action in self.portal.portal_controlpanel.listActions()
            if action.getId().startswith("collective.streamguard")
        }
        self.assertEqual(
            titles,
            {
                "collective.streamguard": "Stream guard",
                "collective.streamguard.viewer": "Live logs",
            },
        )
        for title in titles.values():
            self.assertIsInstance(title, Message)
            self.assertEqual(title.domain, "collective.streamguard")


class TestUninstall(unittest.TestCase):
    layer = STREAMGUARD_INTEGRATION_TESTING

    def setUp(self):
        self.portal = self.layer["portal"]
        setRoles(self.portal, TEST_USER_ID, ["Manager"])
        self.installer = get_installer(self.portal, self.layer["request"])
        self.installer.uninstall_product("collective.streamguard")

    def test_product_is_uninstalled(self):
        self.assertFalse(self.installer.is_product_installed("collective.streamguard"))

    def test_browser_layer_is_removed(self):
        self.assertNotIn(IStreamGuardLayer, registered_layers())

    def test_registry_records_are_removed(self):
        self.assertEqual(our_records(self.portal), [])

    def test_site_keeps_no_setting_of_the_permission(self):
        # rolemap.xml stored the permission's roles on the site object; after
        # uninstall the site is back to Zope's default for the permission.
        self.assertNotIn(pname(VIEW_LOG_STREAMS), self.portal.__dict__)

    def test_configlets_are_removed(self):
        ids = {a.getId() for a in self.portal.portal_controlpanel.listActions()}
        self.assertFalse(ids & {"collective.streamguard", "collective.streamguard.viewer"})

    def test_reinstall_after_uninstall_works(self):
        self.installer.install_product("collective.streamguard")
        self.assertIn(IStreamGuardLayer, registered_layers())
        self.assertEqual(len(our_records(self.portal)), len(IStreamGuardSettings.names()))


class TestUpgrades(unittest.TestCase):
    layer = STREAMGUARD_INTEGRATION_TESTING

    def setUp(self):
        self.portal = self.layer["portal"]
        self.setup = self.portal.portal_setup

    def test_profile_version_is_the_last_upgrade_destination(self):
        self.assertEqual(self.setup.getVersionForProfile("collective.streamguard:default"), "1002")
        self.assertEqual(
            self.setup.getLastVersionForProfile("collective.streamguard:default"), ("1002",)
        )

    def test_1000_to_1001_adds_the_per_user_limit_and_keeps_changed_values(self):
        registry = getUtility(IRegistry, context=self.portal)
        record = PREFIX + "max_streams_per_user"
        # A site installed at 1000: no per-user record, a changed setting.
        del registry.records[record]
        registry[PREFIX + "max_duration"] = 600
        self.setup.setLastVersionForProfile("collective.streamguard:default", "1000")
        steps = self.setup.listUpgrades("collective.streamguard:default")
        self.assertEqual([step["dest"] for step in steps], [("1001",), ("1002",)])
        self.setup.upgradeProfile("collective.streamguard:default")
        self.assertEqual(registry[record], 2)
        self.assertEqual(registry[PREFIX + "max_duration"], 600)
        self.assertEqual(
            self.setup.getLastVersionForProfile("collective.streamguard:default"), ("1002",)
        )

    def test_1001_to_1002_adds_the_parked_stream_settings_and_keeps_changed_values(self):
        registry = getUtility(IRegistry, context=self.portal)
        # A site installed at 1001: no parked-stream records, a changed setting.
        for name in ("park_streams", "max_parked_streams"):
            del registry.records[PREFIX + name]
        registry[PREFIX + "max_streams_per_user"] = 5
        self.setup.setLastVersionForProfile("collective.streamguard:default", "1001")
        steps = self.setup.listUpgrades("collective.streamguard:default")
        self.assertEqual([step["dest"] for step in steps], [("1002",)])
        self.setup.upgradeProfile("collective.streamguard:default")
        self.assertIs(registry[PREFIX + "park_streams"], True)
        self.assertEqual(registry[PREFIX + "max_parked_streams"], 0)
        self.assertEqual(registry[PREFIX + "max_streams_per_user"], 5)
        self.assertEqual(
            self.setup.getLastVersionForProfile("collective.streamguard:default"), ("1002",)
        )
