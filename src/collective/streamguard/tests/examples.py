"""The example views of README.rst, verbatim (test_examples checks that).

Registered by test.zcml and exercised on a real waitress by test_examples.
"""
# example: csv-export
import csv
import io

from Products.Five import BrowserView

from collective.streamguard.streaming import stream_response


class DocumentsCSV(BrowserView):
    """@@documents-csv: every document of the site as CSV, streamed.

    The rows are read in the stream's own ZODB connection, as the user who
    asked; when the browser goes away, the export stops at once.
    """

    def __call__(self):
        self.request.response.setHeader(
            "Content-Disposition", 'attachment; filename="documents.csv"'
        )
        # A plain function, not a method: the producer must not keep the
        # view, whose context belongs to the request's closed connection.
        return stream_response(
            self.request, documents_csv, "text/csv; charset=utf-8",
            zodb=True, context=self.context,
        )


def documents_csv(guard):
    catalog = guard.zodb.site.portal_catalog
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "title", "modified"])
    for brain in catalog(portal_type="Document", sort_on="path"):
        writer.writerow([brain.getPath(), brain.Title, brain.modified.ISO8601()])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
# end example


# example: batch-job
from collective.streamguard.streaming import stream_response  # noqa: E402, F811

BATCH_SIZE = 100

FORM = """<!DOCTYPE html>
<html><body>
<form method="post">
  {authenticator}
  <button type="submit">Upper-case every document's title</button>
</form>
</body></html>
"""


class RetitleDocuments(BrowserView):
    """@@retitle-documents: a long batch job that reports its progress.

    A GET shows a form; posting it (with plone.protect's authenticator)
    runs the job.  It commits every BATCH_SIZE documents; when the browser
    goes away, the documents done since the last commit are aborted and
    the job stops.
    """

    def __call__(self):
        if self.request.get("REQUEST_METHOD") != "POST":
            authenticator = self.context.restrictedTraverse("@@authenticator")
            return FORM.format(authenticator=authenticator.authenticator())
        # A stream writes in its own transaction, which plone.protect never
        # sees: stream_response applies its rule to it.  Without a valid
        # _authenticator, the first commit is refused and nothing is written.
        return stream_response(
            self.request, retitle_documents, zodb=True, context=self.context
        )


def retitle_documents(guard):
    catalog = guard.zodb.site.portal_catalog
    done = 0
    for brain in catalog(portal_type="Document", sort_on="path"):
        document = brain.getObject()
        document.title = document.title.upper()
        document.reindexObject(idxs=["Title"])
        done += 1
        if done % BATCH_SIZE == 0:
            guard.zodb.commit()
        yield f"{done} {brain.getPath()}\n"
    yield f"done: {done} documents\n"  # the last batch commits when we return
# end example
