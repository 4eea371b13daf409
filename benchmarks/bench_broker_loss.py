"""How soon a lost broker (Redis killed or frozen mid-job) reaches the client
and the worker's producer, and how soon the worker takes jobs again.

Run from the repository root with the venv ``make test`` makes:

    .venv/bin/python benchmarks/bench_broker_loss.py --runs 5

The servers are the test layer's (``tests.test_worker_bounds``): runzeo,
Debian's redis-server, a runwsgi web instance and one ``streamguard-worker``,
all on loopback.  Each run opens a server-sent-events stream whose job (on
the worker) has committed 10 documents and waits in ``guard.wait()``, then
takes the broker away, in turns: killed (SIGKILL: its connections close)
or frozen (SIGSTOP: its connections stay open and nothing answers, as when
its host hangs), and measures on CLOCK_MONOTONIC (the worker reports
``time.monotonic()`` through the events file):

- client told: from the kill (or stop) to the ``event: error`` at the
  client;
- producer's finally: from the kill (or stop) to the producer's
  ``finally`` in the worker (its transaction is aborted and its cleanups
  run right after);
- worker back: from Redis answering again (killed: restarted on the same
  port; frozen: SIGCONT, right after the producer's finally) to the next
  job's body at its client.

Nothing is asserted; the stated bounds (README, Where producers run: worker
processes): client within ``BROKER_TIMEOUT`` (5 s), producer within
``POLL`` + ``BROKER_TIMEOUT`` (6 s), worker back within about ``POLL`` (1 s).
"""

import argparse
import os
import platform
import statistics
import sys
import time

from collective.streamguard import workers
from collective.streamguard.tests.helpers import HOST
from collective.streamguard.tests.helpers import HTTPClient
from collective.streamguard.tests.helpers import wait_for
from collective.streamguard.tests.test_worker_bounds import WORKER_BOUNDS
from collective.streamguard.tests.test_workers import ERROR_EVENT


def stream(layer, query):
    sock = HTTPClient((HOST, layer.web.port), timeout=60)
    return sock.request(f"/@@streamguard-test-worker?{query}")


#: How the broker goes away: (taken away, back again).
WAYS = {
    "killed": (lambda layer: layer.kill_redis(), lambda layer: layer.start_redis()),
    "frozen": (lambda layer: layer.freeze_redis(), lambda layer: layer.thaw_redis()),
}


def one_run(layer, n, way):
    tag = f"bench{n}{way}"
    take_away, bring_back = WAYS[way]
    sock = stream(
        layer, f"tag={tag}&mode=batch&count=40&hold=14&run_on=worker&type=text/event-stream"
    )
    sock.read_until(b"created 14\n", 60)
    if not wait_for(lambda: layer.web.events("step", tag=tag, n=14), 30):
        raise SystemExit("the job did not reach its step 14")
    killed = time.monotonic()
    take_away(layer)
    try:
        sock.read_until(ERROR_EVENT, 60)
        told = time.monotonic() - killed
        sock.close()
        if not wait_for(lambda: layer.web.events("producer-finally", tag=tag), 60):
            raise SystemExit("the producer did not stop")
    except BaseException:
        bring_back(layer)  # never leave Redis frozen
        raise
    [finally_] = layer.web.events("producer-finally", tag=tag)
    stopped = finally_["time"] - killed
    bring_back(layer)
    back_from = time.monotonic()
    after = stream(layer, f"tag={tag}-after&mode=sees&run_on=worker")
    after.body(60)
    back = time.monotonic() - back_from
    after.close()
    return told, stopped, back


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each way")
    args = parser.parse_args()
    layer = WORKER_BOUNDS
    layer.setUp()
    results = {way: [] for way in WAYS}
    try:
        # In turns, so that both ways see the same machine.
        for n in range(args.runs):
            for way in WAYS:
                results[way].append(one_run(layer, n, way))
    finally:
        layer.tearDown()
    print(
        f"bench_broker_loss: {args.runs} runs of each way; Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, loopback"
    )
    header = "".join(f"{way + ' median':>16}{way + ' max':>14}" for way in WAYS)
    print(f"{'':<20}{header}  stated bound")
    bounds = (
        f"{workers.BROKER_TIMEOUT} s",
        f"{workers.POLL + workers.BROKER_TIMEOUT} s",
        f"~{workers.POLL} s",
    )
    names = ("client told", "producer's finally", "worker back")
    for index, name in enumerate(names):
        cells = ""
        for way in WAYS:
            values = [r[index] for r in results[way]]
            cells += f"{statistics.median(values) * 1000:>13.0f} ms{max(values) * 1000:>11.0f} ms"
        print(f"{name:<20}{cells}  {bounds[index]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
