"""GenericSetup handlers of the Plone integration."""

from AccessControl.Permission import pname
from Acquisition import aq_inner
from Acquisition import aq_parent
from plone.base.interfaces import INonInstallable
from zope.interface import implementer

from collective.streamguard.permissions import VIEW_LOG_STREAMS


@implementer(INonInstallable)
class HiddenProfiles:
    """Keeps the uninstall profile out of the Add-ons control panel."""

    def getNonInstallableProfiles(self):
        return ["collective.streamguard:uninstall"]


def uninstall(setup_tool):
    """Undo what rolemap.xml did: GenericSetup's rolemap step cannot remove.

    A profile's post_handler is called with portal_setup; its parent is the site.
    """
    site = aq_parent(aq_inner(setup_tool))
    attribute = pname(VIEW_LOG_STREAMS)
    if attribute in site.__dict__:
        delattr(site, attribute)
