"""GenericSetup handlers of the Plone integration."""
from plone.base.interfaces import INonInstallable
from zope.interface import implementer

from collective.streamguard.permissions import VIEW_LOG_STREAMS


@implementer(INonInstallable)
class HiddenProfiles:
    """Keeps the uninstall profile out of the Add-ons control panel."""

    def getNonInstallableProfiles(self):
        return ["collective.streamguard:uninstall"]


def uninstall(context):
    """Undo what rolemap.xml did: GenericSetup's rolemap step cannot remove."""
    site = context.getSite()
    site.manage_permission(VIEW_LOG_STREAMS, roles=(), acquire=True)
