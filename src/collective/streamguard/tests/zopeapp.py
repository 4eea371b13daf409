"""The Zope WSGI application of a ``ZopeInstance``, for gunicorn and uWSGI
(``collective.streamguard.tests.zopeapp:application``)."""

import os

from Zope2.Startup.run import make_wsgi_app

application = make_wsgi_app({}, os.environ["STREAMGUARD_ZOPE_CONF"])
