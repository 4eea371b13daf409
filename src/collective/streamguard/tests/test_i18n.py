"""The translation template lists what the add-on marks for translation.

``make i18n`` refreshes ``locales/collective.streamguard.pot`` with
i18ndude; these tests fail when a marked string was added without it.
"""

import os
import re
import unittest
from xml.dom import minidom

import zope.schema

import collective.streamguard
from collective.streamguard.interfaces import IStreamGuardSettings

PACKAGE = collective.streamguard.__path__[0]
POT = os.path.join(PACKAGE, "locales", "collective.streamguard.pot")


def pot_msgids():
    with open(POT, encoding="utf-8") as f:
        return set(re.findall(r'^msgid "(.+)"$', f.read(), re.MULTILINE))


class TestTranslationTemplate(unittest.TestCase):
    def test_pot_is_of_our_domain(self):
        with open(POT, encoding="utf-8") as f:
            self.assertIn('"Domain: collective.streamguard\\n"', f.read())

    def test_pot_has_every_settings_title_and_description(self):
        missing = set()
        for field in zope.schema.getFields(IStreamGuardSettings).values():
            for message in (field.title, field.description):
                self.assertEqual(message.domain, "collective.streamguard", field.__name__)
                missing.add(str(message))
        self.assertEqual(missing - pot_msgids(), set())

    def test_pot_has_the_configlet_titles(self):
        path = os.path.join(PACKAGE, "profiles", "default", "controlpanel.xml")
        configlets = minidom.parse(path).getElementsByTagName("configlet")
        titles = {c.getAttribute("title") for c in configlets}
        self.assertEqual(len(titles), 2)
        self.assertEqual(titles - pot_msgids(), set())
        for configlet in configlets:
            self.assertEqual(configlet.getAttribute("i18n:attributes"), "title")
