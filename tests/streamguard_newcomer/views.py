"""The views of README.rst, as written there."""
# example: still-there
from Products.Five import BrowserView

from collective.streamguard import is_browser_connection_open


class SlowReport(BrowserView):
    """@@slow-report: the titles of the site's documents, one by one.

    A plain page that takes a while; it stops working as soon as the
    browser has gone, instead of finishing for nobody.
    """

    def __call__(self):
        titles = []
        for brain in self.context.portal_catalog(portal_type="Document", sort_on="id"):
            if not is_browser_connection_open(self.request):
                return ""  # nobody is listening any more
            titles.append(brain.Title)
        self.request.response.setHeader("Content-Type", "text/plain; charset=utf-8")
        return "\n".join(titles)
# end example


# example: progress
from Products.Five import BrowserView  # noqa: E402, F811

from collective.streamguard import client_connection  # noqa: E402
from collective.streamguard import stream_response  # noqa: E402

STEPS = 5


class Progress(BrowserView):
    """@@progress: a job's progress as plain text, a line per step.

    The producer is a plain generator: it never sees the guard, so it holds
    its worker thread for its whole life, and counts against max_streams.
    """

    def __call__(self):
        connection = client_connection(self.request)  # keeps no request

        def body():
            for step in range(1, STEPS + 1):
                yield f"step {step} of {STEPS}\n"
                if connection.wait_closed(timeout=0.2):
                    return  # the client left: stop at once
            yield "done\n"

        return stream_response(self.request, body())
# end example


# example: clock-events
import time  # noqa: E402

from Products.Five import BrowserView  # noqa: E402, F811

from collective.streamguard import stream_response  # noqa: E402, F811


class ClockEvents(BrowserView):
    """@@clock-events: the server's time every second, as server-sent events.

    The producer waits in guard.idle(): under waitress the stream parks
    while it waits, and holds no worker thread.
    """

    def __call__(self):
        return stream_response(
            self.request,
            clock_events,
            "text/event-stream",
            heartbeat=b": keep-alive\n\n",
        )


def clock_events(guard):
    tick = 0
    while True:
        tick += 1
        yield f"id: {tick}\ndata: {time.strftime('%H:%M:%S')}\n\n"
        if (yield from guard.idle(timeout=1.0)):
            return  # the client left, the time is up, or shutdown
# end example


# example: csv-export
import csv  # noqa: E402
import io  # noqa: E402

from Products.Five import BrowserView  # noqa: E402, F811

from collective.streamguard import stream_response  # noqa: E402, F811


class DocumentsCSV(BrowserView):
    """@@documents-csv: every document of the site as CSV, streamed.

    The rows are read in the stream's own ZODB connection, as the user who
    asked; when the browser goes away, the export stops at once.
    """

    #: Where the export runs: None, in the web process (the pool: below).
    run_on = None

    def __call__(self):
        self.request.response.setHeader(
            "Content-Disposition", 'attachment; filename="documents.csv"'
        )
        # A plain function, not a method: the producer must not keep the
        # view, whose context belongs to the request's closed connection.
        return stream_response(
            self.request, documents_csv, "text/csv; charset=utf-8",
            zodb=True, context=self.context, run_on=self.run_on,
        )


def documents_csv(guard, portal_type="Document"):
    catalog = guard.zodb.site.portal_catalog
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "title", "modified"])
    for brain in catalog(portal_type=portal_type, sort_on="path"):
        writer.writerow([brain.getPath(), brain.Title, brain.modified.ISO8601()])
        if buffer.tell() > 64 * 1024:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
# end example


# example: csv-export-on-a-worker
from collective.streamguard.workers import register_producer  # noqa: E402

# By name: a worker runs registered producers only, never code it is sent.
register_producer("streamguard_newcomer.documents-csv")(documents_csv)


class DocumentsCSVOnAWorker(BrowserView):
    """@@documents-csv-on-a-worker: the same export, made by a worker."""

    def __call__(self):
        self.request.response.setHeader(
            "Content-Disposition", 'attachment; filename="documents.csv"'
        )
        return stream_response(
            self.request, documents_csv, "text/csv; charset=utf-8",
            zodb=True, context=self.context, run_on="worker",
            job_args={"portal_type": "Document"},
        )
# end example


# example: batch-job
from Products.Five import BrowserView  # noqa: E402, F811

from collective.streamguard import stream_response  # noqa: E402, F811

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

    #: Where the job runs: None, in the web process (the pool, a worker: below).
    run_on = None

    def __call__(self):
        if self.request.get("REQUEST_METHOD") != "POST":
            authenticator = self.context.restrictedTraverse("@@authenticator")
            return FORM.format(authenticator=authenticator.authenticator())
        # A stream writes in its own transaction, which plone.protect never
        # sees: stream_response applies its rule to it.  Without a valid
        # _authenticator, the first commit is refused and nothing is written.
        return stream_response(
            self.request, retitle_documents, zodb=True, context=self.context,
            run_on=self.run_on,
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


# example: on-the-pool
class DocumentsCSVOnThePool(DocumentsCSV):
    """@@documents-csv-on-the-pool: the same export, on the job pool."""

    run_on = "pool"


class RetitleDocumentsOnThePool(RetitleDocuments):
    """@@retitle-documents-on-the-pool: the same batch job, on the job pool.

    Its commits every BATCH_SIZE documents are the job's transactions, in
    a job thread; when the browser goes away, the job aborts the documents
    done since the last commit and its thread takes the next job.
    """

    run_on = "pool"
# end example


# example: batch-job-on-a-worker
register_producer("streamguard_newcomer.retitle-documents")(retitle_documents)


class RetitleDocumentsOnAWorker(RetitleDocuments):
    """@@retitle-documents-on-a-worker: the same batch job, run by a worker.

    Its commits every BATCH_SIZE documents are the worker's transactions;
    when the browser goes away, the worker aborts the documents done since
    the last commit and takes its next job.
    """

    run_on = "worker"
# end example
