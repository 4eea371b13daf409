"""How soon a lost broker (Redis killed mid-job) reaches the client and the
worker's producer, and how soon the worker takes jobs again.

Run from the repository root with the venv ``make test`` makes:

    .venv/bin/python benchmarks/bench_broker_loss.py --runs 5

The servers are the test layer's (``tests.test_worker_bounds``): runzeo,
Debian's redis-server, a runwsgi web instance and one ``streamguard-worker``,
all on loopback.  Each run opens a server-sent-events stream whose job (on
the worker) has committed 10 documents and waits in ``guard.wait()``, kills
Redis with SIGKILL, and measures on CLOCK_MONOTONIC (the worker reports
``time.monotonic()`` through the events file):

- client told: from the kill to the ``event: error`` at the client;
- producer's finally: from the kill to the producer's ``finally`` in the
  worker (its transaction is aborted and its cleanups run right after);
- worker back: from Redis answering again (restarted on the same port) to
  the next job's first byte at its client.

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


def one_run(layer, n):
    tag = f"bench{n}"
    sock = stream(
        layer, f"tag={tag}&mode=batch&count=40&hold=14&run_on=worker&type=text/event-stream"
    )
    sock.read_until(b"created 14\n", 60)
    if not wait_for(lambda: layer.web.events("step", tag=tag, n=14), 30):
        raise SystemExit("the job did not reach its step 14")
    killed = time.monotonic()
    layer.kill_redis()
    sock.read_until(ERROR_EVENT, 60)
    told = time.monotonic() - killed
    sock.close()
    if not wait_for(lambda: layer.web.events("producer-finally", tag=tag), 60):
        raise SystemExit("the producer did not stop")
    [finally_] = layer.web.events("producer-finally", tag=tag)
    stopped = finally_["time"] - killed
    layer.start_redis()
    back_from = time.monotonic()
    after = stream(layer, f"tag={tag}-after&mode=sees&run_on=worker")
    after.body(60)
    back = time.monotonic() - back_from
    after.close()
    return told, stopped, back


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    layer = WORKER_BOUNDS
    layer.setUp()
    try:
        results = [one_run(layer, n) for n in range(args.runs)]
    finally:
        layer.tearDown()
    print(
        f"bench_broker_loss: {args.runs} runs; Linux {platform.release()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, loopback"
    )
    print(f"{'':<22}{'median':>10}{'max':>10}  stated bound")
    bounds = (
        f"{workers.BROKER_TIMEOUT} s",
        f"{workers.POLL + workers.BROKER_TIMEOUT} s",
        f"~{workers.POLL} s",
    )
    names = ("client told", "producer's finally", "worker back")
    for index, name in enumerate(names):
        values = [r[index] for r in results]
        print(
            f"{name:<22}{statistics.median(values) * 1000:>8.0f} ms"
            f"{max(values) * 1000:>7.0f} ms  {bounds[index]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
