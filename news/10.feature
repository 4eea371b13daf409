Hardening of ``@@stream-log`` and of every stream: configured logs must lie
in the deployment's log directories (zope.conf ``<product-config
collective.streamguard> log-directories``; Zope's own log directories by
default), and ``/proc``, ``/sys``, ``/dev``, ZODB and configuration files,
files with more than one hard link and pseudo-files are refused whatever is
allowed; a per-user stream limit (``max_streams_per_user``, 429); the
last-lines scan runs inside the stream and is bounded; headers go out at
once; TCP keepalive finds vanished clients within 50 s; half-closed clients
get what was there when they asked; a log that becomes unavailable ends its
stream as "log unavailable" with an SSE ``error`` event.  Profile 1001.
