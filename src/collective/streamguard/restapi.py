"""plone.restapi integration (Volto): ``@stream-status`` and the control panel.

Registered by ``restapi.zcml`` only where plone.restapi is installed.
"""

from plone.restapi.controlpanels import RegistryConfigletPanel
from plone.restapi.deserializer import json_body
from plone.restapi.deserializer.controlpanels import ControlpanelDeserializeFromJson
from plone.restapi.services import Service
from zExceptions import BadRequest
from zope.component import adapter
from zope.interface import Interface

from collective.streamguard.browser.status import status
from collective.streamguard.deployment import log_rules
from collective.streamguard.interfaces import IStreamGuardLayer
from collective.streamguard.interfaces import IStreamGuardSettings
from collective.streamguard.interfaces import _
from collective.streamguard.logs.rules import InvalidLogEntry
from collective.streamguard.logs.rules import parse_log_files
from collective.streamguard.settings import PREFIX


class StreamStatusGet(Service):
    """``GET @stream-status``: what ``@@stream-status?format=json`` answers."""

    def reply(self):
        self.request.response.setHeader("Cache-Control", "no-store")
        return status(self.request.environ)


@adapter(Interface, IStreamGuardLayer)
class StreamGuardControlpanel(RegistryConfigletPanel):
    """``@controlpanels/streamguard-controlpanel``: the settings in Volto.

    ``configlet_id`` and ``configlet_category_id`` name the configlet of
    ``profiles/default/controlpanel.xml``: plone.restapi lists a panel, and
    takes its (translated) title, only through its configlet.
    """

    schema = IStreamGuardSettings
    schema_prefix = PREFIX
    configlet_id = "collective.streamguard"
    configlet_category_id = "plone-advanced"
    title = _("Stream guard")


@adapter(StreamGuardControlpanel)
class StreamGuardControlpanelDeserializer(ControlpanelDeserializeFromJson):
    """Refuses the log lines the control panel's form refuses, with the reason.

    plone.restapi validates the schema's fields only, not the form's
    validators: this is ``browser.controlpanel.LogFilesValidator``'s check.
    """

    def __call__(self, mask_validation_errors=True):
        lines = json_body(self.request).get("log_files")
        # Anything but a list of strings is the field deserializer's to refuse.
        if isinstance(lines, list) and all(isinstance(line, str) for line in lines):
            try:
                parse_log_files(lines, log_rules())
            except InvalidLogEntry as error:
                raise BadRequest(
                    [{"message": str(error), "field": "log_files", "error": "ValidationError"}]
                ) from None
        return super().__call__(mask_validation_errors=mask_validation_errors)
