"""Where a request's waitress objects are: the one place that knows.

waitress (2.0 and later) puts ``channel.check_client_disconnected`` into
the environ as ``waitress.client_disconnected``: a bound method, whose
``__self__`` is the request's channel.  A body iterated by waitress itself
is called from ``WSGITask.execute``, whose frame holds the task.

Imports nothing from waitress until a frame is asked about.
"""


def channel_of(environ):
    """The request's waitress channel, or None (another server)."""
    hook = environ.get("waitress.client_disconnected")
    return getattr(hook, "__self__", None)


def server_of(environ):
    """The waitress server that serves the request, or None."""
    return getattr(channel_of(environ), "server", None)


def task_of(frame):
    """The task when ``frame`` is waitress' own ``WSGITask.execute`` iterating
    a body (no middleware in between), else None."""
    if frame is None:
        return None
    try:
        from waitress.task import WSGITask
    except ImportError:
        return None
    if frame.f_code is not WSGITask.execute.__code__:
        return None
    task = frame.f_locals.get("self")
    return task if type(task) is WSGITask else None
