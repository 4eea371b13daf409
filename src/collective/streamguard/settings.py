"""Plone integration: the add-on's registry records as stream defaults."""

from plone.registry.interfaces import IRegistry
from zope.component import queryUtility
from zope.interface import implementer

from collective.streamguard.interfaces import IStreamGuardSettings
from collective.streamguard.interfaces import IStreamSettingsProvider

PREFIX = "collective.streamguard"


@implementer(IStreamSettingsProvider)
class RegistrySettingsProvider:
    """Reads ``IStreamGuardSettings`` from the current site's registry."""

    def __call__(self):
        registry = queryUtility(IRegistry)
        if registry is None:
            return None
        return registry.forInterface(IStreamGuardSettings, prefix=PREFIX, check=False)
