"""Everything this add-on knows of waitress' internals, in one room.

``channel``  where a request's channel, server and task are
``output``   large chunks straight onto a channel (``DirectOutput``)
``park``     a worker lets go of a stream; the hub takes its socket

Written against waitress 3.0 (``output.SUPPORTED``); with any other release
chunks take waitress' ordinary way and nothing parks.
"""
