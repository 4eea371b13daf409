"""Parked @@stream-log viewers on a cluster behind HAProxy, next to one instance.

The cluster of the tests (``collective.streamguard.tests.cluster``): a real
ZEO server (``runzeo``), two Zope instances (``runwsgi``, waitress with 4
threads, ``asyncore_use_poll``) as its clients, and HAProxy with the
shipped configuration (``etc/haproxy.cfg.in``, rendered as `make cluster`
renders it).  Each instance follows its own ``app.log`` under the log name
``app``.  For each N, in one run:

- *cluster*: N SSE viewers of ``@@stream-log?log=app`` opened through
  HAProxy from 20 loopback addresses (HAProxy keeps a client address's
  streams on one instance, so the viewers spread over both), 50 at a time;
- *one instance*: the same N opened straight to instance1, no balancer.

Columns: viewers served and refused; a page's latency (``/``, 200 GETs one
after the other, through HAProxy for the cluster, straight for one
instance) with no viewers and with N, p50/p99; fan-out: one line appended
to the followed log(s), time until each viewer has it, p50/p99 (for the
cluster the line goes to both instances' logs, one write after the other);
memory: the RSS growth of the instances per viewer, and of HAProxy per
viewer.

Run from the repository root, after ``make install-test``::

    .venv/bin/python benchmarks/bench_cluster.py [--counts 1000,5000]

The open-files limit of this process is raised to its hard limit; N is
skipped where N + 600 descriptors do not fit (this process holds one per
viewer; HAProxy two, in its own limit).  Nothing is asserted.
"""

import argparse
import os
import platform
import resource
import selectors
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_parked_streams import page_latencies  # noqa: E402
from bench_parked_streams import percentile  # noqa: E402
from bench_parked_streams import rss_and_fds  # noqa: E402

from collective.streamguard.tests.cluster import ClusterLayer  # noqa: E402
from collective.streamguard.tests.helpers import HOST  # noqa: E402
from collective.streamguard.tests.helpers import wait_for  # noqa: E402
from collective.streamguard.tests.test_cluster import open_viewers  # noqa: E402
from collective.streamguard.tests.test_cluster import source_address  # noqa: E402

FDS_KEPT = 600
SOURCES = [source_address(9, n) for n in range(20)]


def fan_out(socks, log_paths, marker):
    """Append ``marker`` to every log of ``log_paths``; (arrival times, lost)."""
    selector = selectors.DefaultSelector()
    buffers = {}
    for sock in socks:
        sock.setblocking(False)
        try:  # what arrived before (heartbeats) does not count
            while sock.recv(65536):
                pass
        except (BlockingIOError, OSError):
            pass
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = b""
    started = time.monotonic()
    for path in log_paths:
        with open(path, "ab") as f:
            f.write(marker + b"\n")
    arrived = []
    deadline = time.monotonic() + 60
    while buffers and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            sock = key.fileobj
            try:
                buffers[sock] += sock.recv(65536)
            except (BlockingIOError, OSError):
                continue
            if marker in buffers[sock]:
                arrived.append(time.monotonic() - started)
                selector.unregister(sock)
                del buffers[sock]
    selector.close()
    return arrived, len(buffers)


def rss(pid):
    return rss_and_fds(pid)[0]


def measure(layer, kind, count):
    instances = layer.instances
    if kind == "cluster":
        address, port, logs = layer.balancer, layer.port, [i.app_log for i in instances]
        watched = instances
    else:
        address = (HOST, instances[0].port)
        port, logs, watched = instances[0].port, [instances[0].app_log], instances[:1]
    page_latencies(port, "/", 20)  # warm up
    idle_pages = page_latencies(port, "/")
    rss0 = {i.name: rss(i.process.pid) for i in watched}
    haproxy0 = rss(layer.haproxy.pid)
    viewers, failed = open_viewers(address, count, SOURCES)
    try:
        wait_for(lambda: sum(i.status()["parked"] for i in watched) >= len(viewers), 120, 0.5)
        spread = "/".join(str(i.status()["parked"]) for i in watched)
        time.sleep(2)  # let the last parks settle before RSS is read
        grown = sum(rss(i.process.pid) - rss0[i.name] for i in watched)
        haproxy_grown = rss(layer.haproxy.pid) - haproxy0
        busy_pages = page_latencies(port, "/")
        arrived, lost = fan_out(viewers, logs, f"fan-out {uuid.uuid4().hex}".encode())
    finally:
        for sock in viewers:
            sock.close()
    for instance in watched:
        wait_for(lambda: not instance.status()["live"], 120, 0.5)  # noqa: B023
    served = len(viewers) or 1
    return {
        "served": len(viewers),
        "refused": len(failed),
        "spread": spread,
        "page0": (percentile(idle_pages, 50), percentile(idle_pages, 99)),
        "pageN": (percentile(busy_pages, 50), percentile(busy_pages, 99)),
        "fan": (percentile(arrived, 50), percentile(arrived, 99), lost),
        "rss": grown / served,
        "haproxy": (haproxy_grown / served) if kind == "cluster" else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1000,5000")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    haproxy_version = subprocess.run(
        ["haproxy", "-v"], capture_output=True, text=True
    ).stdout.split("\n")[0]
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# {haproxy_version}; open-files limit {hard}")
    print("# runzeo + 2 runwsgi (waitress, 4 threads each) behind HAProxy vs instance1 alone")
    header = (
        f"{'setup':<13} {'N':>5} {'served':>6} {'refused':>7} {'parked':>9} "
        f"{'page p50/p99 ms (0)':>19} {'page p50/p99 ms (N)':>19} "
        f"{'fan-out p50/p99 ms':>18} {'lost':>4} {'KiB/viewer':>10} {'HAProxy KiB/v':>13}"
    )
    layer = ClusterLayer()
    layer.setUp()
    try:
        print(header)
        print("-" * len(header))
        for count in (int(c) for c in args.counts.split(",")):
            if count + FDS_KEPT > hard:
                print(f"# N={count} skipped: the open-files limit is {hard}")
                continue
            for kind in ("cluster", "one instance"):
                r = measure(layer, kind, count)
                haproxy = "-" if r["haproxy"] is None else f"{r['haproxy'] / 1024:.1f}"
                print(
                    f"{kind:<13} {count:>5} {r['served']:>6} {r['refused']:>7} {r['spread']:>9} "
                    f"{r['page0'][0] * 1000:>9.1f}/{r['page0'][1] * 1000:<9.1f} "
                    f"{r['pageN'][0] * 1000:>9.1f}/{r['pageN'][1] * 1000:<9.1f} "
                    f"{r['fan'][0] * 1000:>8.1f}/{r['fan'][1] * 1000:<9.1f} {r['fan'][2]:>4} "
                    f"{r['rss'] / 1024:>10.1f} {haproxy:>13}",
                    flush=True,
                )
    finally:
        layer.tearDown()


if __name__ == "__main__":
    main()
