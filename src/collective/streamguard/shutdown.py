"""Zope integration: stop live streams as soon as the process is told to stop.

Process managers (systemd, supervisord, ``docker stop``) stop Zope with
SIGTERM, whose default action kills Python outright: no ``finally`` block,
no ``atexit`` handler, so live streams would vanish in the middle of their
transactions without their cleanups.  waitress (and Zope's ``runwsgi``)
already shut down cleanly on ``SystemExit``/``KeyboardInterrupt``; after
that ``collective.streamguard.streams`` stops the live streams at exit.
So at process start, where SIGTERM still has its default action, it is
turned into ``SystemExit`` in the main thread.

Live streams are told to stop at the signal itself (SIGTERM and Ctrl-C's
SIGINT), not only at exit: waitress first waits up to 5 s for its busy
threads, which an idle stream would otherwise fill for nothing.  Servers
that handle these signals themselves (gunicorn's workers, uWSGI) have their
own handlers installed and are left alone.
"""

import logging
import signal
import threading

from collective.streamguard.streams import live_streams

logger = logging.getLogger("collective.streamguard")


def _exit_on_sigterm(signum, frame):
    live_streams.begin_shutdown()
    raise SystemExit(128 + signum)


def _interrupt(signum, frame):
    live_streams.begin_shutdown()
    raise KeyboardInterrupt


def install_signal_handlers(event=None):
    """Subscriber of ``IProcessStarting``; safe to call more than once.

    Returns the signals it took over.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    taken = []
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        taken.append(signal.SIGTERM)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
        taken.append(signal.SIGINT)
    if taken:
        logger.debug("live streams stop on %s", ", ".join(s.name for s in taken))
    return taken
