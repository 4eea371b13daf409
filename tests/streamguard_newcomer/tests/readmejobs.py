"""The README's CSV export and batch job moved off the web threads: the
documents they work on, and what their tests check wherever they run (on
the job pool: ``test_plone_pool``; on a worker: ``test_plone_workers``).

``add_documents`` makes ``DOCUMENTS`` documents whose titles report the
batch job's steps and hold it at document ``HELD`` until its client has
gone (``documenttitles``).  ``ReadmeJobChecks`` is a ``TestCase`` mixin
with the checks both places share: the export's bytes, the form's
authenticator, where the job stopped, and what the database holds after
a client left mid-job, read in a connection of the test's own.
"""

import re

from collective.streamguard.tests.documenttitles import HoldingTitle
from collective.streamguard.tests.documenttitles import StepTitle
from streamguard_newcomer.views import BATCH_SIZE

DOCUMENTS = 130
#: The document the batch job is held at until its client has gone.
HELD = 114
#: Each title is long enough that the CSV export makes more than one chunk.
FILLER = " ".join(["lorem ipsum dolor sit amet"] * 20)
#: The note of a stream's transactions, after the context's path.
STREAM_NOTE = "collective.streamguard stream"


def add_documents(site, create):
    """``DOCUMENTS`` documents doc-000, doc-001, ... in ``site``;
    ``create`` is ``plone.dexterity.utils.createContentInContainer``."""
    for n in range(DOCUMENTS):
        title_class = HoldingTitle if n == HELD else StepTitle
        title = title_class(f"document {n:03d} {FILLER}")
        create(site, "Document", checkConstraints=False, id=f"doc-{n:03d}", title=title)


def as_text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


class ReadmeJobChecks:
    """Checks of the README's jobs, wherever they ran (a TestCase mixin)."""

    def assertSameExport(self, in_process, moved):
        """``moved`` (the export made elsewhere) is ``in_process``, byte for
        byte, and that is every document, in more than one chunk."""
        rows = in_process.decode().splitlines()
        self.assertEqual(rows[0], "path,title,modified")
        self.assertEqual(len(rows), DOCUMENTS + 1)
        self.assertGreater(len(in_process), 64 * 1024)  # more than one chunk
        self.assertEqual(moved, in_process)

    def authenticator(self, form):
        """The ``_authenticator`` of the batch job's form, as a browser finds it."""
        match = re.search(rb'name="_authenticator" value="([^"]+)"', form)
        self.assertIsNotNone(match, form[:2000])
        return match.group(1).decode()

    def held_line(self, site_id):
        """The job's line of the document before the held one: the client
        reads it before it leaves."""
        return f"{HELD} /{site_id}/doc-{HELD - 1:03d}\n".encode()

    def assertStoppedInTheHeldStep(self, steps):
        """The job stopped within the step its client left in: no document
        after the held one was touched (``steps``: the documents' numbers,
        as the titles recorded them)."""
        self.assertLess(BATCH_SIZE, HELD)  # the job is held after a commit
        self.assertEqual(steps, list(range(HELD + 1)))

    def assertAbortedSinceTheLastCommit(self, site, db, place, user):
        """What ``site`` (read in a connection of the test's own, after the
        job) and ``db.history()`` show of a batch job left at ``HELD``: the
        first ``BATCH_SIZE`` documents committed together by the job's
        transaction, noted as the stream's (``place``: where it ran, or
        empty) and as ``user``'s; the documents since then as they were, in
        the documents and in the catalog."""
        catalog = site.portal_catalog
        site_id = site.getId()
        titles, indexed, history = [], [], {}
        for n in range(DOCUMENTS):
            document = site[f"doc-{n:03d}"]
            titles.append(str(document.title).split()[:2])
            path = f"/{site_id}/doc-{n:03d}"
            indexed.append(str(catalog.getMetadataForUID(path)["Title"]).split()[:2])
            if n in (0, BATCH_SIZE - 1, BATCH_SIZE):
                history[n] = db.history(document._p_oid, size=1)[0]
        expected = [["DOCUMENT", f"{n:03d}"] for n in range(BATCH_SIZE)]
        expected += [["document", f"{n:03d}"] for n in range(BATCH_SIZE, DOCUMENTS)]
        self.assertEqual(titles, expected)
        self.assertEqual(indexed, expected)  # the catalog followed the commit
        # The first BATCH_SIZE documents were committed together, by the
        # job's transaction, as the user who asked; the next one not since.
        committed = history[0]
        self.assertEqual(history[BATCH_SIZE - 1]["tid"], committed["tid"])
        where = f", {place}" if place else ""
        self.assertEqual(as_text(committed["description"]), f"/{site_id} ({STREAM_NOTE}{where})")
        self.assertEqual(as_text(committed["user_name"]).split(), [user])
        self.assertNotEqual(history[BATCH_SIZE]["tid"], committed["tid"])
        self.assertNotIn(STREAM_NOTE, as_text(history[BATCH_SIZE]["description"]))
