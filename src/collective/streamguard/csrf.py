"""plone.protect's CSRF rule for the transactions of ``zodb=True`` streams.

plone.protect checks a request's writes in its transform, just before the
request's transaction commits: an authenticated request that writes needs
a valid authenticator (the ``_authenticator`` form field or the
``X-CSRF-TOKEN`` header), or the transaction is aborted (GET) or refused
(any other method).  A stream's producer writes in a transaction of its
own, after the request's is over and with the transform chain switched
off: plone.protect never sees it, and a link in a mail could make a
manager's browser run a writing batch job.  So the same rule is decided
here while the view runs (the user, the token and the request are there),
and applied by the stream's session before each commit (``ZODBSession``).

What lets a stream write, as plone.protect lets a request write:

- a valid authenticator in the request (a form posted with
  ``@@authenticator``'s field, or the header);
- ``IDisableCSRFProtection`` provided by the request (the view declares
  that its stream is safe: ``alsoProvides(request, IDisableCSRFProtection)``);
- objects marked with ``plone.protect.utils.safeWrite(obj,
  guard.zodb.request)`` in the producer;
- an anonymous user, or ``PLONE_CSRF_DISABLED`` (plone.protect checks
  neither).
"""

from AccessControl.SecurityManagement import getSecurityManager
from plone.protect.authenticator import check
from plone.protect.authenticator import isAnonymousUser
from plone.protect.interfaces import IDisableCSRFProtection
from plone.protect.utils import SAFE_WRITE_KEY
from zExceptions import Forbidden
from zope.interface import provider
from zope.interface.interfaces import ComponentLookupError

from collective.streamguard.interfaces import IStreamWritePolicy
from collective.streamguard.zodb import WriteRefused


def csrf_disabled():
    # Read when asked, as plone.protect reads it once at import.
    from plone.protect import auto

    return auto.CSRF_DISABLED


@provider(IStreamWritePolicy)
def stream_write_policy(request):
    """None where the request's stream may write, else ``UnprotectedWrites``."""
    if csrf_disabled() or IDisableCSRFProtection.providedBy(request):
        return None
    if isAnonymousUser(getSecurityManager().getUser()):
        return None
    try:
        check(request)
    except (Forbidden, ComponentLookupError):
        return UnprotectedWrites(request.get("ACTUAL_URL", ""))
    return None


class UnprotectedWrites:
    """The stream's request had no CSRF protection: a commit that writes
    anything not marked with ``safeWrite`` is refused."""

    def __init__(self, url):
        self.url = url

    def __call__(self, session):
        safe = session.request.environ.get(SAFE_WRITE_KEY, ()) if session.request else ()
        written = [obj for obj in session.registered_objects() if obj._p_oid not in safe]
        if written:
            raise WriteRefused(
                f"aborting the stream's transaction due to no CSRF protection on url "
                f"{self.url}: it writes {len(written)} object(s), and its request had "
                "neither a valid _authenticator nor IDisableCSRFProtection "
                "(post a form with @@authenticator's field)"
            )
