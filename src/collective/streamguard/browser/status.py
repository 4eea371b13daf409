"""``@@stream-status``: the live streams and how streams ended, for managers."""

import json
from datetime import datetime
from datetime import timezone

from Products.Five import BrowserView

from collective.streamguard import streaming
from collective.streamguard.deployment import WorkersNotConfigured
from collective.streamguard.deployment import instance_name
from collective.streamguard.jobs import pool
from collective.streamguard.streaming import untransformed_headers
from collective.streamguard.streams import live_streams
from collective.streamguard.zodb import open_sessions


def status(environ=None):
    """The process's streams as plain data (``environ``: of the request
    that asks, for the instance's name)."""
    snapshot = live_streams.snapshot()
    live = []
    places = {"held thread": 0, "parked": 0, "pool": 0, "queued": 0, "worker": 0}
    for record in sorted(live_streams.live(), key=lambda r: r.id):
        place, position = where(record)
        parked = getattr(record.guard, "parked", None)
        if parked is not None:
            # A viewer in a fan-out's group counts what the group sent it
            # when it leaves, at its timers, or when asked: now.
            parked.settle_group()
        # "worker NAME" counts as "worker"; "worker queue" too.
        places[place.split(" ")[0] if place.startswith("worker") else place] += 1
        live.append(
            {
                "id": record.id,
                "log": record.log,
                "label": record.label,
                "user": record.user,
                "client": record.client,
                "probe": record.probe,
                "started": datetime.fromtimestamp(record.started, timezone.utc).isoformat(),
                "bytes_sent": record.bytes_sent,
                # Parked: the hub watches it, no thread; else it holds one
                # (it runs now, or it cannot park).
                "parked": record.is_parked,
                "thread": "parked" if record.is_parked else "holds a thread",
                # Where its producer runs: "held thread", "parked", "pool"
                # (a job thread; the stream itself relays, parked between
                # chunks), "queued" (``position`` in the pool's queue),
                # "worker NAME" (a worker process runs it) or "worker
                # queue" (dispatched, no worker has taken it yet).
                "runs": place,
                "position": position,
            }
        )
    return {
        # Counts and limits are this process's: in a cluster, every
        # instance answers for itself.
        "instance": instance_name(environ),
        "scope": "instance",
        "live": live,
        "places": places,
        "pool": pool.snapshot(),
        "workers": _workers_snapshot(),
        "parked": snapshot["parked"],
        "holding_a_thread": snapshot["holding_a_thread"],
        "ended": snapshot["ended"],
        "refused": snapshot["refused"],
        "open_zodb_sessions": open_sessions(),
    }


def _workers_snapshot():
    # Whenever zope.conf names a broker (not only once this process
    # dispatched): ``up`` lists the workers that serve it, so that a
    # deployment can check they run (`make test-cluster` does), and
    # ``queued`` the jobs that wait for one (all instances'); both None
    # while the broker does not answer.
    dispatch = streaming.current_worker_dispatch()
    if dispatch is None:
        try:
            dispatch = streaming.worker_dispatch()
        except WorkersNotConfigured:
            return None
        except ImportError:
            # zope.conf names a broker, but the [workers] extra is missing.
            return None
    snapshot = dispatch.snapshot()
    snapshot["queued"], snapshot["up"] = dispatch.broker_view()
    return snapshot


def where(record):
    """``(place, position)``: where the producer of a live stream runs."""
    place = pool.place_of(record.id)
    if place is not None:
        return place
    dispatch = streaming.current_worker_dispatch()
    place = dispatch.place_of(record.id) if dispatch is not None else None
    if place is not None:
        return place
    return ("parked" if record.is_parked else "held thread"), 0


class StreamStatusView(BrowserView):
    """HTML in the site's look; ``?format=json`` for scripts and monitoring."""

    def __call__(self):
        self.data = status(self.request.environ)
        if self.request.form.get("format") == "json":
            untransformed_headers(self.request, "application/json; charset=utf-8")
            return json.dumps(self.data)
        return self.index()
