"""collective.streamguard: streams that know when the browser has gone.

This module re-exports the public API of the plain-Python core only; it
imports nothing from Zope or Plone, so it is safe to import anywhere.
"""

from collective.streamguard.connection import ClientConnection
from collective.streamguard.connection import ConnectionState
from collective.streamguard.connection import Verdict
from collective.streamguard.connection import client_connection
from collective.streamguard.connection import connection_state
from collective.streamguard.connection import is_browser_connection_open
from collective.streamguard.connection import on_disconnect
from collective.streamguard.connection import wait_for_disconnect

__all__ = [
    "ClientConnection",
    "ConnectionState",
    "Verdict",
    "client_connection",
    "connection_state",
    "is_browser_connection_open",
    "on_disconnect",
    "wait_for_disconnect",
]
