"""The add-on's control panel: the registry settings, log paths checked when saved."""

from plone.app.registry.browser.controlpanel import ControlPanelFormWrapper
from plone.app.registry.browser.controlpanel import RegistryEditForm
from plone.z3cform import layout
from z3c.form import validator
from zope.interface import Invalid
from zope.schema.interfaces import IList

from collective.streamguard.deployment import log_rules
from collective.streamguard.interfaces import IStreamGuardSettings
from collective.streamguard.interfaces import _
from collective.streamguard.logs.rules import InvalidLogEntry
from collective.streamguard.logs.rules import parse_log_files
from collective.streamguard.settings import PREFIX


class StreamGuardSettingsForm(RegistryEditForm):
    schema = IStreamGuardSettings
    schema_prefix = PREFIX
    label = _("Stream guard")
    description = _(
        "Live streams and the logs site managers can follow in the browser (@@stream-log-viewer)."
    )


StreamGuardControlPanel = layout.wrap_form(StreamGuardSettingsForm, ControlPanelFormWrapper)


class LogFilesValidator(validator.SimpleFieldValidator):
    """Refuses a log line that is not acceptable, and says why."""

    def validate(self, value):
        super().validate(value)
        if self.field.__name__ == "log_files":
            try:
                parse_log_files(value, log_rules())
            except InvalidLogEntry as error:
                raise Invalid(str(error)) from None


# Discriminated by the form and the field's type, not the field itself:
# that would mark the registry's schema field with a new interface, and
# plone.registry would no longer find its persistent field.
validator.WidgetValidatorDiscriminators(
    LogFilesValidator, view=StreamGuardSettingsForm, field=IList
)
