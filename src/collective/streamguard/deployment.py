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
import os

from App.config import getConfiguration

from collective.streamguard.logs.rules import LogRules
from collective.streamguard.logs.rules import default_log_directories

PRODUCT = "collective.streamguard"


def configured_log_directories():
    """The ``log-directories`` of zope.conf's product config, as a list."""
    product = (getattr(getConfiguration(), "product_config", None) or {}).get(PRODUCT) or {}
    return str(product.get("log-directories") or "").split()


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
