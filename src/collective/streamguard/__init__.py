"""collective.streamguard: streams that know when the browser has gone.

This module re-exports the public API: the plain-Python core at once, and
``stream_response`` (Zope) and its companions when first asked for, so
importing the package loads nothing from Zope or Plone.

The layers, module by module; imports point one way, Plone -> Zope -> core
(``tests/test_layers.py`` checks it):

core (standard library only; server modules imported lazily)
    ``connection``  is the client still there: ``ClientConnection`` and the API
    ``probes``      how each server (waitress, gunicorn, uWSGI, ZServer) is asked
    ``watcher``     one thread that runs ``on_disconnect`` callbacks
    ``guard``       ``StreamGuard`` and ``GuardedStream``: a producer under guard
    ``streams``     ``LiveStreams``: the process' live streams, cap and counters
    ``shutdown``    SIGTERM and SIGINT stop the live streams
    ``waitress_output``  large chunks straight onto a waitress channel
    ``parked``      a parked stream: its state, output and steps (``Scheduler``)
    ``hub``         parked streams: one epoll thread watches every idle stream
    ``waitress_park``  how a waitress worker lets go of a stream (``hub``)
    ``inotify``     one inotify instance shared by every follower
    ``follow``      ``LogFollower``: one log file followed like ``tail -F``
    ``utf8``        the UTF-8 check of what a follower sends (``_utf8.c``)
    ``logstream``   ``LogStream``: the producer of ``@@stream-log``
    ``logs``        which logs may be streamed, by name
Zope
    ``interfaces``  the settings schema, its defaults, the browser layer
    ``permissions`` the permission's name
    ``streaming``   ``stream_response()``: what a view returns to stream
    ``parking``     which streams park under waitress, and their cap
    ``zodb``        a producer's own ZODB connection and transaction
    ``deployment``  what zope.conf allows: the directories logs may be in
    ``browser.stream_log``, ``browser.status``: the views on a Zope root too
Plone (``plone.zcml``: registered only where Plone is)
    ``settings``    the registry records as the site's settings
    ``setuphandlers``  the uninstall step, hidden profiles
    ``csrf``        plone.protect's CSRF rule for ``zodb=True`` streams' commits
    ``browser.controlpanel``, ``browser.viewer``: the control panel, the viewer
    ``restapi``     ``@stream-status`` and the control panel for plone.restapi
                    (``restapi.zcml``: only where plone.restapi is installed)
"""

from collective.streamguard.connection import ClientConnection
from collective.streamguard.connection import ConnectionState
from collective.streamguard.connection import Verdict
from collective.streamguard.connection import client_connection
from collective.streamguard.connection import connection_state
from collective.streamguard.connection import is_browser_connection_open
from collective.streamguard.connection import on_disconnect
from collective.streamguard.connection import wait_for_disconnect
from collective.streamguard.guard import StreamError
from collective.streamguard.streams import EndReason
from collective.streamguard.streams import live_streams

#: The Zope part of the public API, imported when first asked for: this
#: module must stay importable without Zope (PEP 562).
_ZOPE_API = {"stream_response": "collective.streamguard.streaming"}


def __getattr__(name):
    module = _ZOPE_API.get(name)
    if module is None:
        raise AttributeError(f"module 'collective.streamguard' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "EndReason",
    "StreamError",
    "live_streams",
    "stream_response",
    "ClientConnection",
    "ConnectionState",
    "Verdict",
    "client_connection",
    "connection_state",
    "is_browser_connection_open",
    "on_disconnect",
    "wait_for_disconnect",
]
