"""Interfaces of the Zope and Plone integration: the browser layer and the settings.

The plain-Python core does not import this module.
"""

from zope import schema
from zope.i18nmessageid import MessageFactory
from zope.interface import Interface
from zope.publisher.interfaces.browser import IDefaultBrowserLayer

from collective.streamguard.logs.follower import END_MARKER

_ = MessageFactory("collective.streamguard")

#: The defaults of the settings, also where a Zope without Plone has none.
DEFAULT_MAX_DURATION = 3600
DEFAULT_MAX_STREAMS_PER_USER = 2
DEFAULT_HEARTBEAT_INTERVAL = 15


class IStreamGuardLayer(IDefaultBrowserLayer):
    """Marker of requests to a Plone site where collective.streamguard is installed.

    The add-on's Plone views are registered for this layer, so they exist only
    in sites that installed the add-on.
    """


class IStreamSettingsProvider(Interface):
    """A utility that gives the settings of the current site.

    Calling it returns an object with the fields of ``IStreamGuardSettings``
    as attributes (``stream_response`` reads the stream limits,
    ``@@stream-log`` the log list and the end marker), or None where there
    are no settings.  In Plone the add-on's registry records provide them.
    """

    def __call__():
        """Return the settings object, or None."""


class IStreamWritePolicy(Interface):
    """A utility that decides, while the view runs, whether the writes of a
    ``zodb=True`` stream of this request may be committed.

    The stream's transaction is not the request's: no CSRF check of the
    request ever sees it.  In Plone the add-on applies plone.protect's rule
    (``collective.streamguard.csrf``).
    """

    def __call__(request):
        """None where the stream may write; else a callable taking the
        stream's ``ZODBSession`` that raises
        ``collective.streamguard.zodb.WriteRefused`` when the transaction
        about to be committed writes."""


class IStreamGuardSettings(Interface):
    """Settings of collective.streamguard, kept in plone.registry.

    Every field is a record under ``collective.streamguard.<name>``, added by
    the ``default`` profile and removed by the ``uninstall`` profile.
    """

    max_streams = schema.Int(
        title=_("Maximum live streams per process that hold a thread"),
        description=_(
            "A stream that does not park holds one of the server's worker threads. "
            "0 means: the server's worker threads minus one (waitress' "
            "threads, classic ZServer's zserver-threads), so one thread "
            "always serves normal pages."
        ),
        default=0,
        min=0,
        required=True,
    )

    park_streams = schema.Bool(
        title=_("Park idle streams"),
        description=_(
            "Under waitress, a stream that waits for more to send gives its "
            "worker thread back while it waits; one thread per process "
            "watches every waiting stream. Off: every stream holds a thread "
            "for its whole life."
        ),
        default=True,
        required=False,
    )

    max_parked_streams = schema.Int(
        title=_("Maximum parkable streams per process"),
        description=_(
            "Streams that park use file descriptors, not threads. 0 means: "
            "derived from the process' open-files limit (RLIMIT_NOFILE): "
            "the limit less 512, which is also the most any value gives."
        ),
        default=0,
        min=0,
        required=True,
    )

    max_streams_per_user = schema.Int(
        title=_("Maximum live streams per user"),
        description=_(
            "So that one user cannot hold every stream of the process; beyond "
            "it a stream is refused with 429 Too Many Requests. 0 means no "
            "per-user limit."
        ),
        default=DEFAULT_MAX_STREAMS_PER_USER,
        min=0,
        required=True,
    )

    max_duration = schema.Int(
        title=_("Maximum stream duration (seconds)"),
        description=_("A stream that runs longer is ended. 0 means no limit."),
        default=DEFAULT_MAX_DURATION,
        min=0,
        required=True,
    )

    heartbeat_interval = schema.Int(
        title=_("Heartbeat interval (seconds)"),
        description=_(
            "While a stream is idle, a few bytes are sent this often so that "
            "proxies keep the connection and a client that vanished without "
            "closing its connection is found. 0 turns heartbeats off."
        ),
        default=DEFAULT_HEARTBEAT_INTERVAL,
        min=0,
        required=True,
    )

    end_marker = schema.TextLine(
        title=_("End marker"),
        description=_("A log line starting with this text ends a log stream."),
        default=END_MARKER,
        required=True,
    )

    log_files = schema.List(
        title=_("Additional log files"),
        description=_(
            "One per line: a name, a '|' and an absolute path. The instance's "
            "event log and access log are always available."
        ),
        value_type=schema.TextLine(),
        default=[],
        missing_value=[],
        required=False,
    )
