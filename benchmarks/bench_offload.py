"""Busy streams in process and on the job pool, on a real 4-thread Zope.

A real Zope (``runwsgi``, waitress with 4 threads, a throw-away FileStorage
instance with the add-on, its test views and a manager user) serves
``@@bench-work``: a ``zodb=True`` producer that works in steps, each a
``--reps`` sums over a slice of 2,000 entries of an OOBTree of 20,000 in
its own ZODB connection (about 20 ms of work; ``--steps`` steps, about 10 s in
all), one line per step.  For each place (``in-process``: today's, the
producer on waitress' worker; ``pool``: ``run_on="pool"``, 2 job threads,
a queue of 16; ``workers``: ``run_on="worker"``, 2 ``streamguard-worker``
processes, huey's queue in a Redis started here), in one run.  With
``workers`` among the places the database is a ZEO server (``runzeo``)
for every place, so that the columns compare the same storage.  A fourth
place, ``threads`` (not among the defaults), is the floor of any job in
the web process: two plain threads of the server, no add-on code, doing
the same work as the pool's two jobs (``@@bench-threads``), with the
switch interval the pool sets (``--job-switch-interval``); only its page
and jobs columns apply:

- N concurrent streams (``--streams``, 20) are opened at once: served
  (200, and it runs at once), queued (200, its first line says so),
  refused (anything else, 503);
- a page (``/``, Zope's root) is asked for one request after the other
  while they run, and with no stream; p50/p99 and their ratio;
- jobs completed per minute: streams that ran to their end, over the time
  from the first request until the last one ended;
- close-to-finally: one stream at a time (none other running), the
  client closes in the middle of the work; the time until the producer's
  ``finally`` ran (its ``time.monotonic()``, written to a file: Linux'
  CLOCK_MONOTONIC is shared by processes), median and max of
  ``--closes``.  It includes the rest of the step that was running: a
  producer hears the client at its next chunk.  "After the step" leaves
  that out: from the close, or from the end of that step's work if it
  ended later, to the ``finally`` (what the add-on adds).

Run from the repository root, after ``make install-test``::

    .venv/bin/python benchmarks/bench_offload.py [--streams 20] [--steps 500] [--reps 400] \\
        [--places in-process,pool,workers,threads]

Nothing is asserted.
"""

import argparse
import base64
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_parked_streams import page_latencies  # noqa: E402
from bench_parked_streams import percentile  # noqa: E402
from bench_parked_streams import start_zope  # noqa: E402

from collective.streamguard.tests.helpers import HOST  # noqa: E402
from collective.streamguard.tests.helpers import wait_until_serving  # noqa: E402
from collective.streamguard.tests.servers import executable  # noqa: E402
from collective.streamguard.tests.servers import free_port  # noqa: E402
from collective.streamguard.tests.zopeinstance import ZopeInstance  # noqa: E402

#: Sums per step (``--reps``).
REPS = 400
AUTH = "Basic " + base64.b64encode(b"admin:admin").decode()

BENCH_MODULE = """\
import json
import sys
import threading
import time

from BTrees.OOBTree import OOBTree
from Products.Five import BrowserView
from zope.interface import implementer

from collective.streamguard.interfaces import IStreamSettingsProvider
from collective.streamguard.streaming import stream_response
from collective.streamguard.workers import register_producer

FINALLY = {finally_path!r}
ENTRIES = 20000


class Settings:
    max_streams_per_user = 0
    max_parked_streams = 0


@implementer(IStreamSettingsProvider)
class Provider:
    def __call__(self):
        return Settings()


class Setup(BrowserView):
    def __call__(self):
        tree = OOBTree()
        for n in range(ENTRIES):
            tree[n] = n
        self.context._bench_tree = tree
        return "ok"


class Work(BrowserView):
    def __call__(self):
        form = self.request.form
        run_on = form.get("run_on") or None
        steps = int(form.get("steps", "500"))
        slice_ = int(form.get("slice", "2000"))
        reps = int(form.get("reps", "400"))
        tag = form.get("tag", "")

        return stream_response(
            self.request,
            work,
            zodb=True,
            context=self.context,
            run_on=run_on,
            job_args={{"steps": steps, "slice_": slice_, "reps": reps, "tag": tag}},
        )


@register_producer("bench.work")
def work(guard, steps, slice_, reps, tag):
    yield from work_on(guard.zodb.app._bench_tree, steps, slice_, reps, tag)


def work_on(tree, steps, slice_, reps, tag):
    stepped = None  # when the last step's work was done
    try:
        for n in range(steps):
            start = (n * 997) % ENTRIES
            total = 0
            for _ in range(reps):
                total += sum(tree.values(min=start, max=start + slice_))
            stepped = time.monotonic()
            yield f"{{n}} {{total}}\\n"
    finally:
        with open(FINALLY, "a") as f:
            event = {{"tag": tag, "time": time.monotonic(), "stepped": stepped}}
            f.write(json.dumps(event) + "\\n")


class Threads(BrowserView):
    # The floor of any job in this process: ``count`` plain threads do the
    # same work (each its own ZODB connection; no add-on code), with the
    # switch interval the pool sets while its jobs run; started and left.

    def __call__(self):
        form = self.request.form
        count, steps = int(form.get("count", "2")), int(form.get("steps", "500"))
        reps, tag = int(form.get("reps", "400")), form.get("tag", "")
        interval = float(form.get("switch_ms", "0.5")) / 1000
        db = self.context._p_jar.db()
        left = [count]
        lock = threading.Lock()
        previous = sys.getswitchinterval()
        sys.setswitchinterval(interval)

        def run(n):
            connection = db.open()
            try:
                tree = connection.root()["Application"]._bench_tree
                for _ in work_on(tree, steps, 2000, reps, f"{{tag}}-{{n}}"):
                    pass
            finally:
                connection.close()
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        sys.setswitchinterval(previous)

        for n in range(count):
            threading.Thread(target=run, args=(n,), daemon=True).start()
        return "started"
"""

SITE_ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:browser="http://namespaces.zope.org/browser">
  <include package="Zope2.App" />
  <include package="Products.Five" file="meta.zcml" />
  <include package="collective.streamguard" />
  <utility factory="benchwork.Provider"
      provides="collective.streamguard.interfaces.IStreamSettingsProvider" />
  <browser:page name="bench-setup" for="*" class="benchwork.Setup"
      permission="zope2.ViewManagementScreens" />
  <browser:page name="bench-work" for="*" class="benchwork.Work"
      permission="zope2.ViewManagementScreens" />
  <browser:page name="bench-threads" for="*" class="benchwork.Threads"
      permission="zope2.ViewManagementScreens" />
</configure>
"""


def get(port, path):
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", headers={"Authorization": AUTH})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


class Stream(threading.Thread):
    """One client of ``@@bench-work``: how it was answered, and when it ended."""

    def __init__(self, port, path):
        super().__init__(daemon=True)
        self.port, self.path = port, path
        self.status = None
        self.queued = False
        self.completed = False
        self.ended = None

    def run(self):
        sock = socket.create_connection((HOST, self.port), timeout=600)
        try:
            sock.sendall(
                f"GET {self.path} HTTP/1.1\r\nHost: localhost\r\n"
                f"Authorization: {AUTH}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while b"\r\n\r\n" not in data:
                more = sock.recv(65536)
                if not more:
                    break
                data += more
            self.status = int(data.split(b" ", 2)[1]) if data else 0
            # The first line of the body: a step's, or the queue's notice.
            while (
                self.status == 200
                and b"\n" not in data.partition(b"\r\n\r\n")[2].split(b"\r\n", 1)[-1]
            ):
                more = sock.recv(65536)
                if not more:
                    break
                data += more
            self.queued = b"queued: position" in data.partition(b"\r\n\r\n")[2][:64]
            while True:
                more = sock.recv(1 << 20)
                if not more:
                    break
                data = data[-16:] + more
            self.completed = data.endswith(b"0\r\n\r\n")
        except OSError:
            pass
        finally:
            self.ended = time.monotonic()
            sock.close()


def close_to_finally(port, instance, run_on, closes, steps):
    """Seconds from a client's close, mid-work, to its producer's finally:
    in all, and after the step that was running when it closed (from
    whichever came last, the close or the end of that step's work)."""
    latencies, beyond_step = [], []
    finally_path = os.path.join(instance.home, "var", "finally.jsonl")
    for n in range(closes):
        tag = f"close-{run_on}-{n}"
        sock = socket.create_connection((HOST, port), timeout=60)
        sock.sendall(
            f"GET /@@bench-work?tag={tag}&steps={steps}&run_on={run_on}&reps={REPS} HTTP/1.1\r\n"
            f"Host: localhost\r\nAuthorization: {AUTH}\r\n\r\n".encode()
        )
        data = b""
        while b"\n10 " not in data:  # ten steps in: it works now
            data += sock.recv(65536)
        closed = time.monotonic()
        sock.close()
        deadline = closed + 30
        found = None
        while found is None and time.monotonic() < deadline:
            with open(finally_path) as f:
                for line in f:
                    event = json.loads(line)
                    if event["tag"] == tag:
                        found = event
            if found is None:
                time.sleep(0.001)
        if found is not None:
            latencies.append(found["time"] - closed)
            beyond_step.append(found["time"] - max(closed, found["stepped"] or closed))
    return latencies, beyond_step


def measure(port, instance, run_on, count, steps, closes):
    path = f"/@@bench-work?steps={steps}&run_on={run_on}&reps={REPS}"
    idle = page_latencies(port, "/", 100)
    started = time.monotonic()
    streams = [Stream(port, f"{path}&tag={run_on}-{n}") for n in range(count)]
    for stream in streams:
        stream.start()
    busy = []
    while any(stream.is_alive() for stream in streams):
        busy += page_latencies(port, "/", 10)
    completed = [s for s in streams if s.completed]
    elapsed = max(s.ended for s in completed) - started if completed else float("nan")
    refused = [s for s in streams if s.status != 200]
    queued = [s for s in streams if s.status == 200 and s.queued]
    gone, beyond_step = close_to_finally(port, instance, run_on, closes, steps)
    return {
        "served": count - len(refused) - len(queued),
        "queued": len(queued),
        "refused": len(refused),
        "completed": len(completed),
        "page0": (percentile(idle, 50), percentile(idle, 99)),
        "pageN": (percentile(busy, 50), percentile(busy, 99)),
        "jobs_per_min": len(completed) / elapsed * 60 if completed else 0.0,
        "elapsed": elapsed,
        "gone": (statistics.median(gone) if gone else float("nan"), max(gone, default=0.0)),
        "beyond_step": (
            statistics.median(beyond_step) if beyond_step else float("nan"),
            max(beyond_step, default=0.0),
        ),
    }


def measure_threads(port, instance, steps, switch_ms):
    """The GIL's floor: two plain threads of the server (no add-on) doing the
    same work as the pool's two jobs, with the pool's switch interval."""
    finally_path = os.path.join(instance.home, "var", "finally.jsonl")
    idle = page_latencies(port, "/", 100)
    tag = f"threads-{time.monotonic()}"
    started = time.monotonic()
    get(port, f"/@@bench-threads?count=2&steps={steps}&reps={REPS}&tag={tag}&switch_ms={switch_ms}")

    def ended():
        with open(finally_path) as f:
            return [e for e in map(json.loads, f) if e["tag"].startswith(tag)]

    busy = []
    while len(ended()) < 2:
        busy += page_latencies(port, "/", 10)
    elapsed = max(e["time"] for e in ended()) - started
    return {
        "page0": (percentile(idle, 50), percentile(idle, 99)),
        "pageN": (percentile(busy, 50), percentile(busy, 99)),
        "completed": 2,
        "jobs_per_min": 2 / elapsed * 60,
    }


def row(place, r):
    """One line of the table; "-" where the place has no such figure."""

    def pair(key, width):
        if key not in r:
            return f"{'-':>{2 * width + 1}}"
        return f"{r[key][0] * 1000:>{width}.1f}/{r[key][1] * 1000:<{width}.1f}"

    counts = [r.get(key, "-") for key in ("served", "queued", "refused")]
    return (
        f"{place:<11} {counts[0]:>6} {counts[1]:>6} {counts[2]:>7} {r['completed']:>4} "
        f"{pair('page0', 9)} {pair('pageN', 9)} "
        f"{r['pageN'][0] / r['page0'][0]:>5.1f} {r['pageN'][1] / r['page0'][1]:>5.1f} "
        f"{r['jobs_per_min']:>8.1f} {pair('gone', 12)} {pair('beyond_step', 12)}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--closes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=400, help="sums of 2,000 entries per step")
    parser.add_argument("--places", default="in-process,pool,workers")
    parser.add_argument(
        "--job-switch-interval",
        default="",
        help="zope.conf's job-switch-interval (ms, or off; default: the add-on's)",
    )
    parser.add_argument(
        "--worker-nice", default="", help="the workers' zope.conf worker-nice (default: 10)"
    )
    args = parser.parse_args()
    places = args.places.split(",")
    port = free_port()
    helpers = []  # runzeo, redis-server, workers: stopped at the end
    zeo = None
    if "workers" in places:
        zeo_port = free_port()
        zeo_home = ZopeInstance(free_port())  # for its temp dir
        helpers.append(
            subprocess.Popen(
                [
                    executable("runzeo"),
                    "-a",
                    f"{HOST}:{zeo_port}",
                    "-f",
                    os.path.join(zeo_home.home, "var", "zeo.fs"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_until_serving(zeo_port, helpers[-1], timeout=30.0, path=None)
        zeo = f"{HOST}:{zeo_port}"
    instance = ZopeInstance(port, zeo=zeo, stream_log=True)
    home = instance.home
    product = []  # zope.conf's <product-config collective.streamguard>
    if zeo is not None:
        redis_port, password = free_port(), secrets.token_hex(16)
        helpers.append(
            subprocess.Popen(
                [
                    shutil.which("redis-server") or "/usr/bin/redis-server",
                    "--port",
                    str(redis_port),
                    "--bind",
                    HOST,
                    "--requirepass",
                    password,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    os.path.join(home, "var"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_until_serving(redis_port, helpers[-1], timeout=30.0, path=None)
        product.append(f"worker-broker redis://:{password}@{HOST}:{redis_port}/0")
        product.append(f"worker-secret {secrets.token_hex(16)}")
    if args.job_switch_interval:
        product.append(f"job-switch-interval {args.job_switch_interval}")
    if args.worker_nice:
        product.append(f"worker-nice {args.worker_nice}")
    if product:
        with open(instance.zope_conf, "a") as f:
            f.write("<product-config collective.streamguard>\n")
            f.writelines(f"  {line}\n" for line in product)
            f.write("</product-config>\n")
    with open(os.path.join(home, "etc", "site.zcml"), "w") as f:
        f.write(SITE_ZCML)
    finally_path = os.path.join(home, "var", "finally.jsonl")
    open(finally_path, "a").close()
    with open(os.path.join(home, "benchwork.py"), "w") as f:
        f.write(BENCH_MODULE.format(finally_path=finally_path))
    from Zope2.utilities.mkwsgiinstance import write_inituser

    write_inituser(os.path.join(home, "inituser"), "admin", "admin")
    open(instance.stream_log, "a").close()
    env = {**os.environ, **instance.env}
    env["PYTHONPATH"] = os.pathsep.join((home, env["PYTHONPATH"]))
    process = start_zope(instance, env)
    try:
        wait_until_serving(port, process)
        if zeo is not None:
            for n in range(2):
                log = os.path.join(home, "var", f"worker-{n}.log")
                helpers.append(
                    subprocess.Popen(
                        [executable("streamguard-worker"), instance.zope_conf],
                        env=env,
                        cwd=home,
                        stdout=open(log, "ab"),  # noqa: SIM115
                        stderr=subprocess.STDOUT,
                    )
                )
                while "serves jobs" not in open(log).read():
                    if helpers[-1].poll() is not None:
                        raise SystemExit(f"a worker failed to start: {open(log).read()}")
                    time.sleep(0.05)
        get(port, "/@@bench-setup")
        page_latencies(port, "/", 20)  # warm up
        # One stream alone: how long the work takes.
        global REPS
        REPS = args.reps
        alone = Stream(port, f"/@@bench-work?steps={args.steps}&run_on=&tag=alone&reps={REPS}")
        t0 = time.monotonic()
        alone.run()
        if alone.status != 200 or not alone.completed:
            raise SystemExit(f"the work view failed: {alone.status}")
        print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        print(
            f"# runwsgi + waitress 4 threads; {args.streams} concurrent streams of "
            f"{args.steps} steps; one alone takes {alone.ended - t0:.1f} s; pool 2, queue 16, "
            f"job-switch-interval {args.job_switch_interval or 'default'}; "
            f"worker-nice {args.worker_nice or 'default'}; "
            f"{'ZEO, 2 workers' if zeo else 'FileStorage'}"
        )
        header = (
            f"{'place':<11} {'served':>6} {'queued':>6} {'refused':>7} {'done':>4} "
            f"{'page p50/p99 ms (0)':>19} {'page p50/p99 ms (N)':>19} {'p50 x':>5} "
            f"{'p99 x':>5} {'jobs/min':>8} {'close->finally ms med/max':>25} "
            f"{'after the step ms med/max':>25}"
        )
        print(header)
        print("-" * len(header))
        for place in places:
            if place == "threads":
                interval = args.job_switch_interval or "0.5"
                r = measure_threads(
                    port, instance, args.steps, 5 if interval == "off" else interval
                )
            else:
                run_on = {"pool": "pool", "workers": "worker"}.get(place, "")
                r = measure(port, instance, run_on, args.streams, args.steps, args.closes)
            print(row(place, r), flush=True)
    finally:
        process.kill()
        process.wait(10)
        for helper in reversed(helpers):
            helper.terminate()
            helper.wait(20)
        instance.remove()
        if zeo is not None:
            zeo_home.remove()


if __name__ == "__main__":
    main()
