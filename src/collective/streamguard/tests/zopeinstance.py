"""A throw-away Zope instance (Zope only, no Plone) for servers run as
subprocesses: Zope's own ``runwsgi``, gunicorn and uWSGI.

It loads the add-on and the test views (``test.zcml``); producers report to
a JSON-lines file named by ``STREAMGUARD_TEST_EVENTS`` (``views.record``).
"""

import json
import os
import shutil
import tempfile

from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.servers import SRC

SITE_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope">
  <include package="Zope2.App" />
  <include package="collective.streamguard" />
  <include package="collective.streamguard.tests" file="test.zcml" />
</configure>
"""

ZOPE_CONF = """\
%import ZEO
%define INSTANCE {home}
instancehome $INSTANCE
<zodb_db main>
{storage}
  mount-point /
</zodb_db>
"""

FILESTORAGE = """\
  <filestorage>
    path $INSTANCE/var/Data.fs
  </filestorage>"""

ZEOCLIENT = """\
  <zeoclient>
    server {zeo}
    storage 1
    name zeostorage
    var $INSTANCE/var
  </zeoclient>"""

ZOPE_INI = """\
[app:main]
use = egg:Zope#main
zope_conf = %(here)s/zope.conf

[server:main]
use = egg:waitress#main
host = {host}
port = {port}
threads = 4
{server_options}
[loggers]
keys = root{stream_logger_key}

[handlers]
keys = eventlog{stream_handler_key}

[formatters]
keys = generic

[logger_root]
level = {root_level}
handlers = eventlog

[handler_eventlog]
class = FileHandler
args = (r'{home}/var/event.log', 'a')
formatter = generic

{stream_log}
[formatter_generic]
format = %(asctime)s %(levelname)s [%(name)s] %(message)s
"""

STREAM_LOG = """\
[logger_streamguard]
level = INFO
handlers = streamlog
qualname = collective.streamguard
propagate = 0

[handler_streamlog]
class = FileHandler
args = (r'{home}/var/streams.log', 'a')
formatter = generic
"""


class ZopeInstance:
    """``home`` holds etc/ and var/; ``env`` is what a server process needs.

    ``zeo``: the "host:port" of a ZEO server to use instead of a FileStorage.
    ``server_options``: more settings of waitress (``[server:main]``).
    ``stream_log``: the add-on's own lines (streams ended, and failures) go to
    var/streams.log (``self.stream_log``), not to the event log, which a
    benchmark's streams follow, and the event log takes only warnings.
    """

    def __init__(self, port, zeo=None, server_options=None, stream_log=False):
        self.home = tempfile.mkdtemp(prefix="streamguard-zope-")
        os.makedirs(os.path.join(self.home, "etc"))
        os.makedirs(os.path.join(self.home, "var"))
        self.zope_conf = os.path.join(self.home, "etc", "zope.conf")
        self.zope_ini = os.path.join(self.home, "etc", "zope.ini")
        self.events_path = os.path.join(self.home, "var", "events.jsonl")
        self.event_log = os.path.join(self.home, "var", "event.log")
        self.stream_log = os.path.join(self.home, "var", "streams.log")
        with open(os.path.join(self.home, "etc", "site.zcml"), "w") as f:
            f.write(SITE_ZCML)
        with open(self.zope_conf, "w") as f:
            storage = ZEOCLIENT.format(zeo=zeo) if zeo else FILESTORAGE
            f.write(ZOPE_CONF.format(home=self.home, storage=storage))
        with open(self.zope_ini, "w") as f:
            options = "".join(f"{k} = {v}\n" for k, v in (server_options or {}).items())
            f.write(
                ZOPE_INI.format(
                    home=self.home,
                    host=HOST,
                    port=port,
                    server_options=options,
                    stream_logger_key=", streamguard" if stream_log else "",
                    stream_handler_key=", streamlog" if stream_log else "",
                    stream_log=STREAM_LOG.format(home=self.home) if stream_log else "",
                    root_level="WARNING" if stream_log else "INFO",
                )
            )
        self.env = {
            "STREAMGUARD_TEST_EVENTS": self.events_path,
            "STREAMGUARD_ZOPE_CONF": self.zope_conf,
            "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])),
        }

    def events(self, name=None, since=0, **match):
        """The events recorded (``tests.views.record``) that match, from the
        ``since``-th on (``event_count()`` at some earlier moment)."""
        return [
            e
            for e in self._all_events()[since:]
            if (name is None or e["event"] == name) and all(e.get(k) == v for k, v in match.items())
        ]

    def event_count(self):
        return len(self._all_events())

    def _all_events(self):
        try:
            with open(self.events_path) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def remove(self):
        shutil.rmtree(self.home, ignore_errors=True)
