"""The control panel saves good settings and refuses bad log paths with a reason."""

import os
import shutil
import tempfile
import unittest

from plone.app.testing import TEST_USER_ID
from plone.app.testing import setRoles
from plone.registry.interfaces import IRegistry
from zope.component import getUtility
from zope.interface import alsoProvides

from collective.streamguard.interfaces import IStreamGuardLayer
from collective.streamguard.testing import STREAMGUARD_INTEGRATION_TESTING
from collective.streamguard.tests.streamcases import allow_log_directories


class TestControlPanel(unittest.TestCase):
    layer = STREAMGUARD_INTEGRATION_TESTING

    def setUp(self):
        self.portal = self.layer["portal"]
        self.request = self.layer["request"]
        alsoProvides(self.request, IStreamGuardLayer)
        setRoles(self.portal, TEST_USER_ID, ["Manager"])
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.log = os.path.join(self.directory, "app.log")
        open(self.log, "w").close()
        allow_log_directories(self, self.directory)

    def submit(self, log_files):
        form = self.request.form
        form.update(
            {
                "form.widgets.max_streams": "0",
                "form.widgets.park_streams": ["selected"],
                "form.widgets.max_parked_streams": "0",
                "form.widgets.max_streams_per_user": "2",
                "form.widgets.max_duration": "3600",
                "form.widgets.heartbeat_interval": "15",
                "form.widgets.end_marker": "<<<<<EOFMARKER>>>>>",
                "form.widgets.log_files": "\n".join(log_files),
                "form.buttons.save": "Save",
            }
        )
        self.request.method = "POST"
        view = self.portal.restrictedTraverse("@@streamguard-controlpanel")
        html = view()
        return view.form_instance, html

    def saved_log_files(self):
        return getUtility(IRegistry)["collective.streamguard.log_files"]

    def test_good_lines_are_saved(self):
        form, _ = self.submit([f"app|{self.log}"])
        self.assertEqual(self.saved_log_files(), [f"app|{self.log}"])

    def test_bad_path_is_refused_with_the_reason(self):
        form, html = self.submit(["app|relative.log"])
        self.assertEqual(self.saved_log_files(), [])
        self.assertIn("relative.log is not an absolute path", html)

    def test_a_file_outside_the_deployments_log_directories_is_refused(self):
        form, html = self.submit(["env|/proc/self/environ", "db|/srv/var/Data.fs"])
        self.assertEqual(self.saved_log_files(), [])
        self.assertIn("is under /proc: never a log", html)

    def test_symlink_is_refused(self):
        link = os.path.join(self.directory, "link.log")
        os.symlink(self.log, link)
        form, html = self.submit([f"app|{link}"])
        self.assertEqual(self.saved_log_files(), [])
        self.assertIn("is a symbolic link", html)

    def test_parked_stream_settings_are_saved(self):
        self.submit([f"app|{self.log}"])
        registry = getUtility(IRegistry)
        self.assertIs(registry["collective.streamguard.park_streams"], True)
        self.assertEqual(registry["collective.streamguard.max_parked_streams"], 0)

    def test_configlet_is_listed_in_site_setup(self):
        ids = {a.getId() for a in self.portal.portal_controlpanel.listActions()}
        self.assertLessEqual({"collective.streamguard", "collective.streamguard.viewer"}, ids)
