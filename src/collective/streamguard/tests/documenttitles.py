"""Document titles that report the README's batch job's steps.

The README's batch job (``retitle_documents``) calls ``title.upper()`` on
every document, one per step, and runs ahead of its client by what the
relays hold (hundreds of KiB): a client that reads a line cannot know
where the job is.  These titles are ``str`` as Plone stores them, with an
``upper()`` that tells the test which document the job is at (``step``,
into ``views.record``'s file), so that the README's producer runs
unchanged; the step's record names the thread it ran in.  The one a
``HoldingTitle`` is holds the job at its document until the job's client
has gone, in the producer's own ``guard.wait()``, as a producer that
waits for something would: the test then knows that the client left in
the middle of that step.  It also adds a cleanup to the job's guard
(``cleanup``, with the stream's end reason), so that the test can count
how many times the job's cleanups ran.

Stored in the ZODB (and in the catalog's metadata) by class, so the web
instance and the worker import this module: it imports nothing at the top.
"""

import sys
import threading
import time

#: How long a held step waits for its client to leave, at most.
HOLD_LIMIT = 60.0


def number(title):
    """The document's number, from its title "document NNN ..."."""
    return int(title.split()[1])


class StepTitle(str):
    """A title whose ``upper()`` records the step (``step``, ``n``, ``thread``)."""

    def upper(self):
        from collective.streamguard.tests.views import record

        record("step", n=number(self), thread=threading.current_thread().name)
        return str(self).upper()


class HoldingTitle(StepTitle):
    """A title whose ``upper()`` holds the job until its client has gone."""

    def upper(self):
        from collective.streamguard.tests.views import record

        # The README's producer calls it with its guard in a local.
        guard = sys._getframe(1).f_locals["guard"]
        guard.add_cleanup(lambda: record("cleanup", n=number(self), reason=guard.reason.value))
        record("held", n=number(self))
        deadline = time.monotonic() + HOLD_LIMIT
        while not guard.wait(1):
            if time.monotonic() > deadline:
                record("hold-timeout", n=number(self))
                break
        record("resumed", n=number(self))
        return super().upper()
