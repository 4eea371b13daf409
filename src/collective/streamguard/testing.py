"""Test layers of collective.streamguard.

Streams are tested over real sockets against a real waitress server (the
in-process test browser drains the whole body and would hang on a stream).
"""

from plone.app.testing import PLONE_FIXTURE
from plone.app.testing import FunctionalTesting
from plone.app.testing import IntegrationTesting
from plone.app.testing import PloneSandboxLayer
from plone.app.testing import applyProfile
from plone.testing import zope
from webtest.http import StopableWSGIServer


class StreamGuardLayer(PloneSandboxLayer):
    """A Plone site with collective.streamguard installed."""

    defaultBases = (PLONE_FIXTURE,)

    def setUpZope(self, app, configurationContext):
        import collective.streamguard
        import collective.streamguard.tests

        self.loadZCML(package=collective.streamguard)
        self.loadZCML(package=collective.streamguard.tests, name="test.zcml")
        self.loadZCML(package=collective.streamguard.tests, name="plone.zcml")

    def setUpPloneSite(self, portal):
        applyProfile(portal, "collective.streamguard:default")


STREAMGUARD_FIXTURE = StreamGuardLayer()

STREAMGUARD_INTEGRATION_TESTING = IntegrationTesting(
    bases=(STREAMGUARD_FIXTURE,), name="StreamGuardLayer:IntegrationTesting"
)

STREAMGUARD_FUNCTIONAL_TESTING = FunctionalTesting(
    bases=(STREAMGUARD_FIXTURE,), name="StreamGuardLayer:FunctionalTesting"
)


class StreamGuardDistributionLayer(StreamGuardLayer):
    """The add-on in a site as the ``Plone`` distribution makes it.

    Integrators install ``Plone``, which brings plone.restapi (Volto's API,
    JWT login) and plone.app.caching; both are set up before the add-on.
    """

    def setUpZope(self, app, configurationContext):
        import plone.app.caching
        import plone.restapi

        self.loadZCML(package=plone.restapi)
        self.loadZCML(package=plone.app.caching)
        # The JWT PAS plugin's class is registered by the product.
        zope.installProduct(app, "plone.restapi")
        super().setUpZope(app, configurationContext)

    def setUpPloneSite(self, portal):
        applyProfile(portal, "plone.restapi:default")
        applyProfile(portal, "plone.app.caching:default")
        super().setUpPloneSite(portal)


STREAMGUARD_DISTRIBUTION_FIXTURE = StreamGuardDistributionLayer()


class WaitressServer(zope.WSGIServer):
    """plone.testing's real waitress server, with waitress options of our choosing.

    ``waitress_options`` go straight to waitress (``threads``,
    ``channel_request_lookahead``, ...).  Unlike plone.testing's fixture,
    tracebacks are not exposed to clients, as on a production site: a test
    that sees one has found a bug.
    """

    def __init__(self, bases=None, name=None, module=None, **waitress_options):
        super().__init__(bases=bases, name=name, module=module)
        self.waitress_options = {"threads": 4, **waitress_options}

    def setUpServer(self):
        app = self.make_wsgi_app()
        options = {
            "clear_untrusted_proxy_headers": False,
            "expose_tracebacks": False,
            "host": self.host or "127.0.0.1",
            **self.waitress_options,
        }
        if self.port is not None:
            options["port"] = int(self.port)
        self.server = StopableWSGIServer.create(app, **options)
        self["host"] = self.host = self.server.effective_host
        self["port"] = self.port = int(self.server.effective_port)
        self["server"] = self.server

    def tearDownServer(self):
        del self["server"]
        super().tearDownServer()


# waitress as Zope and Plone run it: 4 threads, channel_request_lookahead 0.
WAITRESS_SERVER_FIXTURE = WaitressServer(name="StreamGuardWaitress:4threads")

STREAMGUARD_WAITRESS_TESTING = FunctionalTesting(
    bases=(STREAMGUARD_FIXTURE, WAITRESS_SERVER_FIXTURE),
    name="StreamGuardLayer:Waitress",
)

# The same server, for the site with plone.restapi and plone.app.caching (as
# plone.restapi's PLONE_RESTAPI_DX_FUNCTIONAL_TESTING shares plone.testing's).
STREAMGUARD_DISTRIBUTION_WAITRESS_TESTING = FunctionalTesting(
    bases=(STREAMGUARD_DISTRIBUTION_FIXTURE, WAITRESS_SERVER_FIXTURE),
    name="StreamGuardDistributionLayer:Waitress",
)
