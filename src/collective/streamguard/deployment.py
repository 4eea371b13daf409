"""What the deployment, not the site, decides: where configured logs may live.

A Plone site manager edits the log list through the web; the directories
those logs may be in are set where only the system administrator can, in
zope.conf (plone.recipe.zope2instance: ``zope-conf-additional``)::

    <product-config collective.streamguard>
        log-directories /var/log/myapp /srv/logs
    </product-config>

The directories of Zope's own event and access logs are always allowed;
the instance's ``etc/`` is always refused (``logs.LogRules`` lists the rest).
"""

import functools
import logging
import os
import socket

from App.config import getConfiguration

from collective.streamguard.logs.rules import LogRules
from collective.streamguard.logs.rules import default_log_directories

PRODUCT = "collective.streamguard"

logger = logging.getLogger("collective.streamguard")


def configured_log_directories():
    """The ``log-directories`` of zope.conf's product config, as a list."""
    product = product_config()
    return str(product.get("log-directories") or "").split()


def instance_name(environ=None):
    """The name of this instance in a cluster: zope.conf's
    ``<product-config collective.streamguard> instance-name``, else the
    host's name and the port this request came in on (``host:8080``).
    Status pages show it, because their counts and limits are this
    process's only."""
    product = product_config()
    configured = str(product.get("instance-name") or "").strip()
    if configured:
        return configured
    port = (environ or {}).get("SERVER_PORT")
    host = host_name()
    return f"{host}:{port}" if port else host


@functools.lru_cache(maxsize=1)
def host_name():
    """The host's name, asked once: ``@@stream-log`` names its instance in
    every stream's first event, and ``gethostname()`` is a system call that
    lets go of the interpreter's lock (a thousand viewers arrive at once
    after a restart)."""
    return socket.gethostname()


def job_pool_settings():
    """``(size, queue_size, switch_interval)`` of the job pool
    (``stream_response(run_on="pool")``): zope.conf's ``job-pool-size`` and
    ``job-queue-size``, else 2 and 16, and ``job-switch-interval``: the
    interpreter's switch interval while jobs run, in milliseconds (0.5;
    ``off`` leaves it alone), returned in seconds or None.

    Set per process in zope.conf, not per site in the registry: the pool is
    the process's, shared by every site it serves.  Each job of a
    ``zodb=True`` stream holds a connection of the database's pool while it
    runs."""
    from collective.streamguard.jobs import DEFAULT_POOL_SIZE
    from collective.streamguard.jobs import DEFAULT_QUEUE_SIZE
    from collective.streamguard.jobs import DEFAULT_SWITCH_INTERVAL

    product = product_config()
    return (
        _whole_number(product, "job-pool-size", DEFAULT_POOL_SIZE, 1),
        _whole_number(product, "job-queue-size", DEFAULT_QUEUE_SIZE, 0),
        _switch_interval(product, DEFAULT_SWITCH_INTERVAL),
    )


def _switch_interval(product, default):
    """zope.conf's ``job-switch-interval`` (milliseconds, more than 0 and
    at most 5, or ``off``) in seconds; None for ``off``; the default (and
    one warning) for anything else."""
    value = product.get("job-switch-interval")
    if value is None:
        return default
    text = str(value).strip().lower()
    if text == "off":
        return None
    try:
        milliseconds = float(text)
    except ValueError:
        milliseconds = None
    if milliseconds is None or not 0 < milliseconds <= 5:
        _warn_once("job-switch-interval", value, "milliseconds in (0, 5] or off", default * 1000)
        return default
    return milliseconds / 1000


_warned = set()


def product_config():
    """zope.conf's ``<product-config collective.streamguard>`` (a dict;
    empty without one)."""
    return (getattr(getConfiguration(), "product_config", None) or {}).get(PRODUCT) or {}


def _whole_number(product, name, default, least):
    """zope.conf's ``name`` as a whole number of at least ``least``; the
    default (and one warning) for anything else."""
    value = product.get(name)
    if value is None:
        return default
    try:
        return max(least, int(str(value).strip()))
    except ValueError:
        _warn_once(name, value, "a whole number", default)
        return default


def _warn_once(name, value, expected, default):
    """One warning per setting and bad value: they are read per request."""
    if (name, value) not in _warned:
        _warned.add((name, value))
        logger.warning("zope.conf: %s %r is not %s; using %g", name, value, expected, default)


def log_rules():
    """The ``LogRules`` of this process (made again when zope.conf's
    directories or Zope's own logs change: tests change them)."""
    instance = getattr(getConfiguration(), "instancehome", None)
    refused = (os.path.join(instance, "etc"),) if instance else ()
    directories = tuple(default_log_directories() + configured_log_directories())
    return _rules(directories, refused)


@functools.lru_cache(maxsize=8)
def _rules(directories, refused):
    # LogRules resolves its directories once (realpath), not per request.
    return LogRules(directories, refused)


class WorkersNotConfigured(ValueError):
    """``run_on="worker"`` without zope.conf's broker and secret."""


def worker_settings():
    """``(broker_url, secret)`` of worker processes (``run_on="worker"``):
    zope.conf's ``worker-broker`` (``redis://:password@host:port/0``) and
    ``worker-secret`` (the key that signs job messages; the same on the
    web instances and the workers).  Raises ``WorkersNotConfigured``."""
    product = product_config()
    url = str(product.get("worker-broker") or "").strip()
    secret = str(product.get("worker-secret") or "").strip()
    if not url or not secret:
        raise WorkersNotConfigured(
            "run_on='worker' needs worker-broker and worker-secret in zope.conf's "
            "<product-config collective.streamguard>"
        )
    return url, secret


def worker_nice():
    """A worker's zope.conf ``worker-nice``: the niceness of its process
    (0 to 19, else 10), so that jobs that compute on the web instances'
    host leave them the CPU when their pages need it (measured:
    ``benchmarks/bench_offload.py``)."""
    from collective.streamguard.workers import DEFAULT_NICE

    return min(19, _whole_number(product_config(), "worker-nice", DEFAULT_NICE, 0))


def worker_queue_size():
    """zope.conf's ``worker-queue-size``: how many jobs may wait for a
    worker (``run_on="worker"``), counted across the cluster (the queue in
    Redis that all web instances share), else 16; past it a request gets
    503 with Retry-After.  At least 1 (a job passes through the queue even
    when a worker is free)."""
    from collective.streamguard.workers import DEFAULT_QUEUE_SIZE

    product = product_config()
    return _whole_number(product, "worker-queue-size", DEFAULT_QUEUE_SIZE, 1)
