"""The newcomer's own test layers, as README.rst's Testing section shows."""

# example: testing-layer
from plone.app.testing import FunctionalTesting
from plone.app.testing import PloneSandboxLayer

from collective.streamguard.testing import STREAMGUARD_FIXTURE
from collective.streamguard.testing import WAITRESS_SERVER_FIXTURE


class NewcomerLayer(PloneSandboxLayer):
    """A Plone site with collective.streamguard and this add-on's views."""

    defaultBases = (STREAMGUARD_FIXTURE,)

    def setUpZope(self, app, configurationContext):
        import streamguard_newcomer

        self.loadZCML(package=streamguard_newcomer)


NEWCOMER_FIXTURE = NewcomerLayer()

# Streams are tested over real sockets, on a real waitress (4 threads).
NEWCOMER_WAITRESS_TESTING = FunctionalTesting(
    bases=(NEWCOMER_FIXTURE, WAITRESS_SERVER_FIXTURE),
    name="NewcomerLayer:Waitress",
)
# end example
