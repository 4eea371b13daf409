"""A Plone site on ZEO with a web instance, Redis and a worker.

``PLONE_WORKERS`` is ``workerstack.WorkersLayer`` (runzeo, redis-server,
one ``runwsgi`` web instance, one ``streamguard-worker``, all on loopback)
with Plone: the instances load the ZCML of `make run` (``etc/site.zcml``)
and the README's package (``tests/streamguard_newcomer``), and before they
start, ``zconsole run`` creates the site as `make run` and `make cluster`
do (``scripts/create_site.py``) and adds the README's jobs' documents
(``readmejobs.add_documents``: their titles report the batch job's steps).  Plone
takes its time to start, so there is one layer for every test of the
README's producers on a worker, and the web instance and the worker start
side by side.

What tests use: ``layer.web`` (its ``port``, ``events()``), ``layer.worker``
(the process), ``layer.worker_output()``, ``layer.zeo_port``, ``SITE_ID``,
``ADMIN``.
"""

import os
import secrets

from collective.streamguard.tests.servers import SRC
from collective.streamguard.tests.workerstack import WorkersLayer

ROOT = os.path.dirname(SRC)
SITE_ID = "Plone"
ADMIN = ("admin", secrets.token_hex(8))

SCRIPT = """\
import runpy

import transaction
from plone.dexterity.utils import createContentInContainer
from zope.component.hooks import setSite

from streamguard_newcomer.tests.readmejobs import add_documents

runpy.run_path({create_site!r}, init_globals={{"app": app}})
site = app[{site_id!r}]
setSite(site)
add_documents(site, createContentInContainer)
transaction.commit()
"""


class PloneWorkersLayer(WorkersLayer):
    """WorkersLayer with a Plone site (see the module docstring)."""

    __name__ = "PLONE_WORKERS"

    start_timeout = 240.0

    def new_home(self, port=None):
        home = super().new_home(port)
        with open(os.path.join(ROOT, "etc", "site.zcml")) as f:
            zcml = f.read()
        # `make run`'s ZCML, and the README's package.
        zcml = zcml.replace(
            "</configure>", '  <include package="streamguard_newcomer" />\n\n</configure>'
        )
        with open(os.path.join(home.home, "etc", "site.zcml"), "w") as f:
            f.write(zcml)
        home.env["PYTHONPATH"] = os.pathsep.join(
            [os.path.join(ROOT, "tests"), home.env["PYTHONPATH"]]
        )
        home.env.update(SITE_ID=SITE_ID, ADMIN_USER=ADMIN[0], ADMIN_PASSWORD=ADMIN[1])
        if os.environ.get("STREAMGUARD_PLONE") == "6.1":
            # As the Makefile's run and cluster targets (see there).
            home.env["AUTOINCLUDE_ALLOW_MODULE_NOT_FOUND_ERROR"] = "1"
        return home

    prepare_script = SCRIPT

    def script_values(self):
        """The site, as `make run` creates it, and the documents."""
        create_site = os.path.join(ROOT, "scripts", "create_site.py")
        return {"create_site": create_site, "site_id": SITE_ID}


PLONE_WORKERS = PloneWorkersLayer()
