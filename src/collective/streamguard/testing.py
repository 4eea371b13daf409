"""Test layers of collective.streamguard, and helpers for testing streams.

For an integrator's own tests (README, Testing):

- ``STREAMGUARD_FIXTURE``: a Plone site with the add-on installed, and
  nothing else; base your own layer on it.
  ``STREAMGUARD_INTEGRATION_TESTING``, ``STREAMGUARD_FUNCTIONAL_TESTING``.
- ``STREAMGUARD_WAITRESS_TESTING``, ``WAITRESS_SERVER_FIXTURE``,
  ``WaitressServer``: the site on a real waitress.  Streams are tested over
  real sockets: the in-process test browser drains the whole body and
  would hang on a stream.
- ``open_stream``, ``StreamClient``, ``wait_for_streams_to_end``,
  ``end_reasons``, ``committed_site``.

The add-on's own tests also use its test views (``TEST_VIEWS_*``), a site
as the ``Plone`` distribution makes it, and the real classic ZServer
(``STREAMGUARD_ZSERVER_TESTING``).
"""

import os
import sys
import threading

from plone.app.testing import PLONE_FIXTURE
from plone.app.testing import FunctionalTesting
from plone.app.testing import IntegrationTesting
from plone.app.testing import PloneSandboxLayer
from plone.app.testing import applyProfile
from plone.testing import Layer
from plone.testing import zca
from plone.testing import zope
from webtest.http import StopableWSGIServer

import collective.streamguard.tests
from collective.streamguard.streams import live_streams
from collective.streamguard.tests.helpers import HTTPClient as StreamClient
from collective.streamguard.tests.helpers import wait_for


class StreamGuardLayer(PloneSandboxLayer):
    """A Plone site with collective.streamguard installed, and nothing else:
    the fixture for an integrator's own layer (``defaultBases``)."""

    defaultBases = (PLONE_FIXTURE,)

    def setUpZope(self, app, configurationContext):
        import collective.streamguard

        self.loadZCML(package=collective.streamguard)

    def setUpPloneSite(self, portal):
        applyProfile(portal, "collective.streamguard:default")


STREAMGUARD_FIXTURE = StreamGuardLayer()

STREAMGUARD_INTEGRATION_TESTING = IntegrationTesting(
    bases=(STREAMGUARD_FIXTURE,), name="StreamGuardLayer:IntegrationTesting"
)

STREAMGUARD_FUNCTIONAL_TESTING = FunctionalTesting(
    bases=(STREAMGUARD_FIXTURE,), name="StreamGuardLayer:FunctionalTesting"
)


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

#: The add-on's site on a real waitress: streams over real sockets.
STREAMGUARD_WAITRESS_TESTING = FunctionalTesting(
    bases=(STREAMGUARD_FIXTURE, WAITRESS_SERVER_FIXTURE),
    name="StreamGuardLayer:Waitress",
)


# -- helpers for tests of streaming views -------------------------------------


def open_stream(layer, path, auth=None, method="GET", headers=None, form=None, source=None):
    """Send one request to the layer's real waitress and return the client.

    ``path`` is the path and query (``/plone/@@my-stream?n=1``), ``auth``
    (user, password) for basic auth, ``form`` a dict to post, ``source``
    the local address to connect from (``127.0.0.2``: another anonymous
    client, with per-address limits of its own).  The client
    (``StreamClient``) reads the response while it is still being produced:
    ``head()``, ``read_until(marker)``, ``body()``, ``closed()``, and leaves
    with ``close()`` (a FIN) or ``reset()``.
    """
    client = StreamClient((layer["host"], layer["port"]), source=source)
    return client.request(path, method=method, headers=headers, auth=auth, form=form)


def set_product_config(testcase, **settings):
    """zope.conf's ``<product-config collective.streamguard>`` with
    ``settings`` added, for the rest of ``testcase``."""
    from App.config import getConfiguration

    config = getConfiguration()
    before = getattr(config, "product_config", None)
    product = dict((before or {}).get("collective.streamguard") or {}, **settings)
    config.product_config = {**(before or {}), "collective.streamguard": product}
    testcase.addCleanup(setattr, config, "product_config", before)


def wait_for_streams_to_end(timeout=10.0):
    """True once no stream of this process is live any more: every one has
    ended and run its cleanups (they run in the server's threads)."""
    return wait_for(lambda: not live_streams.live(), timeout)


def committed_site(testcase, site_id="plone"):
    """The site as a new ZODB connection sees it: what is committed, as a
    stream's own connection sees it.  The connection is closed when
    ``testcase`` ends."""
    import transaction

    manager = transaction.TransactionManager()
    connection = testcase.layer["zodbDB"].open(transaction_manager=manager)
    testcase.addCleanup(connection.close)
    testcase.addCleanup(manager.abort)
    return connection.root()["Application"][site_id]


def end_reasons():
    """How many streams of this process ended for each reason, by the
    reason's value (``{"finished": 3, "client gone": 1, ...}``)."""
    return live_streams.snapshot()["ended"]


# -- the add-on's own tests: its test views too --------------------------------


class StreamGuardTestViewsLayer(StreamGuardLayer):
    """The add-on's site with the add-on's own test views (``tests/``)."""

    def setUpZope(self, app, configurationContext):
        super().setUpZope(app, configurationContext)
        self.loadZCML(package=collective.streamguard.tests, name="test.zcml")


TEST_VIEWS_FIXTURE = StreamGuardTestViewsLayer()

TEST_VIEWS_INTEGRATION_TESTING = IntegrationTesting(
    bases=(TEST_VIEWS_FIXTURE,), name="StreamGuardTestViewsLayer:IntegrationTesting"
)

TEST_VIEWS_WAITRESS_TESTING = FunctionalTesting(
    bases=(TEST_VIEWS_FIXTURE, WAITRESS_SERVER_FIXTURE),
    name="StreamGuardTestViewsLayer:Waitress",
)


class StreamGuardDistributionLayer(StreamGuardTestViewsLayer):
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

# The same server, for the site with plone.restapi and plone.app.caching (as
# plone.restapi's PLONE_RESTAPI_DX_FUNCTIONAL_TESTING shares plone.testing's).
STREAMGUARD_DISTRIBUTION_WAITRESS_TESTING = FunctionalTesting(
    bases=(STREAMGUARD_DISTRIBUTION_FIXTURE, WAITRESS_SERVER_FIXTURE),
    name="StreamGuardDistributionLayer:Waitress",
)

#: Where ``make install-test`` puts ZServer (``pip install --target``).
ZSERVER_DIR_ENV = "STREAMGUARD_ZSERVER"


def zserver_directory():
    return os.environ.get(ZSERVER_DIR_ENV) or os.path.join(sys.prefix, "zserver")


class _AccessLog:
    """medusa's logger interface; the access log goes nowhere."""

    def log(self, message):
        pass


class ZServerServer(Layer):
    """The real classic ZServer 4.0.2 HTTP server, in this process on
    127.0.0.1, publishing the Zope app of plone.testing's ``STARTUP`` as
    the module ``Zope2`` (``ZServerPublisher`` publishes no other name: any
    other is dropped silently and the request hangs).

    ZServer is a Python 2 package: it is loaded from ``zserver_directory()``
    through ``tests.zserver_compat`` (read its docstring for what that
    changes).  Its asyncore loop runs in a thread of its own.  PubCore's
    pool of ``threads`` workers is process-global, ZServer reads the thread
    count once per process, and the workers never stop: so there is one
    such server per test process, its workers are started in set-up, and
    tear-down closes the server and its channels but leaves the idle
    workers waiting.

    Resources: ``host``, ``port``, ``zserver`` (the ``zhttp_server``), and
    ``zserver_skip``: why ZServer is missing where ``STREAMGUARD_SKIP_MISSING``
    allows it (the buildout route), else None.
    """

    defaultBases = (zope.STARTUP,)
    #: zope.conf's ``zserver-threads`` default.
    threads = 2

    def setUp(self):
        from collective.streamguard.tests import servers
        from collective.streamguard.tests import zserver_compat

        self.server = self.thread = None
        self["zserver_skip"] = None
        directory = zserver_directory()
        try:
            zserver_compat.install(directory)
        except zserver_compat.ZServerMissing as missing:
            if not servers.may_be_missing("zserver"):
                raise zserver_compat.ZServerMissing(
                    f"{missing}; `make install-test` installs ZServer "
                    f"{zserver_compat.VERSION} into .venv/zserver ({ZSERVER_DIR_ENV} "
                    f"names another directory; where it cannot be installed, "
                    f"{servers.SKIP_MISSING_ENV}=zserver skips its tests)"
                ) from None
            self["zserver_skip"] = f"{missing} ({servers.SKIP_MISSING_ENV} allows it)"
            self["zserver"] = None
            return
        from ZServer.Zope2.Startup import config

        if hasattr(config, "setNumberOfThreads"):  # it deletes itself
            config.setNumberOfThreads(self.threads)
        if config.ZSERVER_THREADS != self.threads:
            raise RuntimeError(f"ZServer runs {config.ZSERVER_THREADS} threads in this process")
        from ZServer.HTTPServer import zhttp_handler
        from ZServer.HTTPServer import zhttp_server
        from ZServer.ZPublisher import Publish

        # get_module_info caches Zope2.bobo_application (in a default
        # argument, which zserver_compat names .cache): drop the one an
        # earlier STARTUP left.
        Publish.get_module_info.cache.clear()
        self.server = zhttp_server("127.0.0.1", 0, logger_object=_AccessLog())
        # medusa puts the configured port in SERVER_PORT; 0 was ours.
        self.server.port = self.server.server_port
        self.server.install_handler(zhttp_handler("Zope2", ""))
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="ZServer asyncore", daemon=True)
        self.thread.start()
        # PubCore starts its workers at the first request; start them now,
        # with one that they drop (any module name but Zope2, Zope2WSGI).
        from ZServer.PubCore import handle

        handle("collective.streamguard: start the workers", None, None)
        self["host"] = "127.0.0.1"
        self["port"] = self.server.server_port
        self["zserver"] = self.server

    def _loop(self):
        import asyncore

        # As ZServer's own loop (Lifetime.loop): select(), woken by the
        # PubCore workers through ZEvent's trigger.
        while not self._stopping:
            asyncore.loop(timeout=1.0, count=1)

    def tearDown(self):
        del self["zserver_skip"]
        del self["zserver"]
        if self.thread is None:
            return
        import asyncore

        from ZServer.PubCore.ZEvent import Wakeup

        self._stopping = True
        Wakeup()
        self.thread.join(10)
        if self.thread.is_alive():
            raise RuntimeError("ZServer's asyncore loop did not stop")
        for dispatcher in list(asyncore.socket_map.values()):
            if dispatcher is self.server or getattr(dispatcher, "server", None) is self.server:
                dispatcher.close()
        self.server = self.thread = None
        del self["host"]
        del self["port"]


ZSERVER_ZCML = zca.ZCMLSandbox(
    bases=(zope.STARTUP,),
    name="StreamGuardZServer:ZCML",
    filename="test.zcml",
    package=collective.streamguard.tests,
)

ZSERVER_FIXTURE = ZServerServer(bases=(ZSERVER_ZCML,), name="StreamGuardZServer:2threads")

STREAMGUARD_ZSERVER_TESTING = zope.FunctionalTesting(
    bases=(ZSERVER_FIXTURE,), name="StreamGuardLayer:ZServer"
)
