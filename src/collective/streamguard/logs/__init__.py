"""Live logs: one file followed like ``tail -F``, for ``@@stream-log``.

Plain Python (Linux inotify through ctypes).  Which files may be streamed
is decided by ``rules`` with the deployment's directories
(``collective.streamguard.deployment``); the view is
``browser/stream_log.py``.
"""
