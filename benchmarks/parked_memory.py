"""What each parked ``@@stream-log`` SSE stream keeps alive, by tracemalloc.

The Zope of ``bench_parked_streams.py`` (``runwsgi``, waitress with 4
threads, ``asyncore_use_poll``) serves N idle server-sent-event streams of
``@@stream-log?log=app`` (a log of its own), opened by this process.  Inside the server a
small probe (``PROBE`` below, loaded by the instance's settings module)
answers SIGUSR1: ``start`` begins tracing after a warm-up (20 streams opened
and closed, so that the hub, the shared inotify instance, the ZODB
connections and Zope's caches exist before), ``report`` writes what was
allocated since and is still alive, once every stream is parked:

- bytes per stream: every traced block still alive, divided by N;
- by allocation site: the innermost frame in the add-on, waitress, Zope or
  the standard library that allocated it;
- by object kind: the traced objects (gc-tracked ones and what they refer
  to) by type, sys.getsizeof;
- from one ``ParkedStream``: what it reaches that was allocated since the
  start (others' streams, and what existed before, are not entered), by
  attribute path;
- counts of the objects of one request (Zope's request and response, the
  WSGI environ, waitress' parser and task, buffers) that are still alive.

``--idle S`` reports again after S s idle (heartbeats every 15 s): what grew
meanwhile.  ``--no-trace`` measures only the RSS growth per stream, as the
benchmark does.  Nothing is asserted.  Run from the repository root::

    .venv/bin/python benchmarks/parked_memory.py --count 300
"""

import argparse
import json
import os
import resource
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_parked_streams as bench  # noqa: E402

PATH = bench.ZOPE_PATH
HEADERS = bench.ZOPE_HEADERS

PROBE = r'''
import collections, gc, json, linecache, os, signal, sys, traceback, tracemalloc

HOME = os.path.dirname(os.path.abspath(__file__))
FRAMES = 40
MARKS = ("collective/streamguard", "waitress/", "ZPublisher/", "Zope2/", "ZODB/",
         "zope/", "Products/", "transaction/", "AccessControl/")


def site(frame):
    line = linecache.getline(frame.filename, frame.lineno).strip()
    short = "/".join(frame.filename.split("/")[-2:])
    return f"{short}:{frame.lineno} {line[:70]}"


def owner_frame(tb):
    # tb is oldest first: the innermost frame in the add-on, else in
    # waitress, else in Zope, else the innermost.
    for marks in (MARKS[:1], MARKS[1:2], MARKS[2:]):
        for frame in reversed(tb):
            if any(mark in frame.filename for mark in marks):
                return frame
    return tb[-1]


BASELINE = set()


def baseline():
    BASELINE.clear()
    for obj in gc.get_objects():
        BASELINE.add(id(obj))
        for ref in gc.get_referents(obj):
            BASELINE.add(id(ref))


def typename(t):
    return f"{type.__dict__['__module__'].__get__(t)}.{type.__dict__['__qualname__'].__get__(t)}"


def new(obj):
    # Python 3.11's get_object_traceback() misses instances with a managed
    # __dict__ (their block starts before the object): those are new when
    # their id was not there at the start.
    if tracemalloc.get_object_traceback(obj) is not None:
        return True
    return type(obj).__flags__ & MANAGED_DICT and id(obj) not in BASELINE


MANAGED_DICT = 1 << 4  # Py_TPFLAGS_MANAGED_DICT


def kinds():
    counts = collections.Counter()
    sizes = collections.Counter()
    seen = set()
    for obj in gc.get_objects():
        for o in [obj, *gc.get_referents(obj)]:
            if id(o) in seen or not new(o):
                continue
            seen.add(id(o))
            name = typename(type(o))
            counts[name] += 1
            sizes[name] += sys.getsizeof(o)
    return counts, sizes


def interesting():
    wanted = {
        "ZPublisher.HTTPRequest.HTTPRequest": "Zope HTTPRequest",
        "ZPublisher.HTTPResponse.WSGIResponse": "Zope WSGIResponse",
        "waitress.parser.HTTPRequestParser": "waitress HTTPRequestParser",
        "waitress.task.WSGITask": "waitress WSGITask",
        "streamguard.waitress.park.ParkingChannel": "waitress channel",
        "waitress.buffers.OverflowableBuffer": "waitress OverflowableBuffer",
        "waitress.buffers.BytesIOBasedBuffer": "waitress BytesIOBasedBuffer",
        "_io.BytesIO": "BytesIO",
        "parking.stream.ParkedStream": "ParkedStream",
        "streaming.StreamIterator": "StreamIterator",
        "guard.StreamGuard": "StreamGuard",
        "logs.stream.LogStream": "LogStream",
        "logs.follower.LogFollower": "LogFollower",
        "logs.inotify.Subscriber": "inotify Subscriber",
        "streams.StreamRecord": "StreamRecord",
        "probes.WaitressConnection": "WaitressConnection",
        "socket.socket": "socket",
        "weakref.finalize": "weakref.finalize",
        "threading.Condition": "threading.Condition",
        "functools.partial": "functools.partial",
        "builtins.frame": "frame",
        "builtins.cell": "cell",
    }
    found = collections.defaultdict(list)
    environs = []
    for obj in gc.get_objects():
        t = type(obj)
        name = typename(t)
        for key, label in wanted.items():
            if name.endswith(key):
                found[label].append(obj)
        if t is dict and "wsgi.input" in obj:
            environs.append(obj)
    found["WSGI environ"] = environs
    return found


def chain(obj, stop, depth=12):
    """A referrer path from obj up to an object of a class named in stop."""
    ignore = {id(sys._getframe())}
    frontier = [(obj, [])]
    seen = {id(obj)}
    for _ in range(depth):
        nxt = []
        for o, path in frontier:
            for r in gc.get_referrers(o):
                if id(r) in seen or id(r) in ignore or r is frontier or r is nxt:
                    continue
                if type(r).__name__ in ("list",) and len(r) > 10000:
                    continue
                seen.add(id(r))
                p = path + [type(r).__name__]
                if type(r).__name__ in stop:
                    return " <- ".join(p)
                nxt.append((r, p))
        frontier = nxt[:2000]
    return "(no path to " + "/".join(stop) + ")"


def walk(root):
    """Objects allocated since start that root reaches, by attribute path
    (an instance's __dict__ counts with the instance)."""
    stop_types = ("ParkedStream", "StreamRecord", "Hub", "Scheduler", "LiveStreams")
    sizes = collections.Counter()
    seen = {id(root)}
    queue = collections.deque([(root, "stream")])
    while queue:
        obj, path = queue.popleft()
        size = sys.getsizeof(obj)
        if isinstance(obj, (type, type(sys))):
            sizes[path] += size
            continue
        names = {}
        children = []
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            seen.add(id(d))
            size += sys.getsizeof(d)
            for k, v in d.items():
                names.setdefault(id(v), "." + k)
                children.append(v)
        for c in type(obj).__mro__:
            for s in getattr(c, "__slots__", ()):
                v = getattr(obj, s, None)
                if v is not None:
                    names.setdefault(id(v), "." + s)
                    children.append(v)
        sizes[path] += size
        children.extend(gc.get_referents(obj))
        for ref in children:
            if id(ref) in seen or not new(ref):
                continue
            if type(ref).__name__ in stop_types:
                continue
            seen.add(id(ref))
            step = names.get(id(ref), "[" + type(ref).__name__ + "]")
            depth = path.count(".") + path.count("[")
            queue.append((ref, path + step if depth < 4 else path))
    return sizes


def report(count):
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    traces = snapshot.traces
    total = sum(t.size for t in traces)
    by_site = collections.Counter()
    by_inner = collections.Counter()
    for t in traces:
        tb = t.traceback
        by_site[site(owner_frame(tb))] += t.size
        by_inner[(site(owner_frame(tb)), site(tb[-1]))] += t.size
    counts, sizes = kinds()
    found = interesting()
    alive = {label: len(objs) for label, objs in found.items()}
    chains = {}
    for label in ("Zope HTTPRequest", "Zope WSGIResponse", "WSGI environ",
                  "waitress HTTPRequestParser", "waitress WSGITask", "BytesIO",
                  "waitress OverflowableBuffer", "frame"):
        objs = found.get(label)
        if objs:
            chains[label] = chain(objs[len(objs) // 2], ("ParkedStream", "Hub", "module"))
    ended = [g for g in found.get("StreamGuard", ()) if g.reason is not None]
    alive["StreamGuard (ended)"] = len(ended)
    if ended:
        chains["StreamGuard (ended)"] = chain(ended[0], ("Hub", "module", "Scheduler"))
    walks = {}
    from collective.streamguard import hub
    streams = list(hub.hub().handlers.values())
    if streams:
        walks = walk(streams[len(streams) // 2])
    return {
        "count": count,
        "traced": total,
        "blocks": len(traces),
        "by_site": by_site.most_common(40),
        "by_inner": by_inner.most_common(40),
        "kinds": [(n, counts[n], s) for n, s in sizes.most_common(40)],
        "alive": alive,
        "chains": chains,
        "walk": sorted(walks.items(), key=lambda kv: -kv[1])[:60],
        "timers": hub.hub().pending_timers(),
    }


def handle(signum, frame):
    with open(os.path.join(HOME, "probe.cmd")) as f:
        command = f.read().split()
    try:
        if command[0] == "start":
            gc.collect()
            baseline()
            tracemalloc.start(FRAMES)
            result = {}
        else:
            result = report(int(command[1]))
    except Exception:
        result = {"error": traceback.format_exc()}
    out = os.path.join(HOME, "probe.json")
    with open(out + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)


signal.signal(signal.SIGUSR1, handle)
'''


def ask(process, home, command, timeout=600):
    out = os.path.join(home, "probe.json")
    if os.path.exists(out):
        os.remove(out)
    with open(os.path.join(home, "probe.cmd"), "w") as f:
        f.write(command)
    process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not os.path.exists(out):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer to {command!r}")
        time.sleep(0.2)
    with open(out) as f:
        result = json.load(f)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def wait_status(port, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = bench.status(port)
        if predicate(data):
            return data
        time.sleep(0.5)
    raise RuntimeError(f"status never matched: {data}")


def show(result, count, label):
    kib = 1024 * count
    print(
        f"\n== {label}: {result['traced'] / kib:.1f} KiB traced per stream "
        f"({result['blocks'] / count:.0f} blocks), {result['timers']} timer entries"
    )
    print("-- by allocation site (innermost frame in the add-on/waitress/Zope), B/stream")
    for where, size in result["by_site"]:
        if size / count >= 16:
            print(f"{size / count:8.0f}  {where}")
    print("-- by (that site, innermost frame), B/stream")
    for (where, inner), size in result["by_inner"]:
        if size / count >= 16:
            print(f"{size / count:8.0f}  {where}\n          <- {inner}")
    print("-- by object kind: type, objects/stream, B/stream")
    for name, number, size in result["kinds"]:
        if size / count >= 16:
            print(f"{size / count:8.0f}  {number / count:5.1f}  {name}")
    print("-- alive per stream")
    for name, number in sorted(result["alive"].items()):
        print(f"{number / count:8.2f}  {name}")
    for name, path in result["chains"].items():
        print(f"   {name}: {path}")
    print("-- reached from one ParkedStream (allocated since start), B")
    for path, size in result["walk"]:
        if size >= 16:
            print(f"{size:8d}  {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--idle", type=float, default=0)
    parser.add_argument("--no-trace", action="store_true")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = args.count
    port = bench.free_port()
    instance, _log_path, env = bench.zope_instance(
        port, count, settings_extra="\nimport memprobe  # noqa\n"
    )
    home = instance.home
    with open(os.path.join(home, "memprobe.py"), "w") as f:
        f.write(PROBE)
    process = bench.start_zope(instance, env)
    try:
        bench.wait_until_serving(port, process)
        bench.page_latencies(port, "/", 20)
        warm, _ = bench.open_streams(port, PATH, 20, b"retry:", HEADERS)
        wait_status(port, lambda d: d["parked"] >= len(warm))
        for sock in warm:
            sock.close()
        wait_status(port, lambda d: not d["live"])
        bench.status(port)
        if not args.no_trace:
            ask(process, home, "start")
        rss0, fds0 = bench.rss_and_fds(process.pid)
        socks, refused = bench.open_streams(port, PATH, count, b"retry:", HEADERS)
        wait_status(port, lambda d: d["parked"] >= len(socks))
        time.sleep(2)
        rss1, fds1 = bench.rss_and_fds(process.pid)
        served = len(socks)
        print(
            f"# {served} streams parked ({refused} refused); RSS "
            f"{(rss1 - rss0) / 1024 / served:.1f} KiB/stream"
            f"{' (with tracemalloc)' if not args.no_trace else ''}, "
            f"fds {(fds1 - fds0) / served:.2f}/stream"
        )
        if not args.no_trace:
            show(ask(process, home, f"report {served}"), served, "parked")
        if args.idle:
            time.sleep(args.idle)
            rss2, _ = bench.rss_and_fds(process.pid)
            idle = f"after {args.idle:.0f} s idle"
            print(f"# {idle}: RSS {(rss2 - rss0) / 1024 / served:.1f} KiB/stream")
            if not args.no_trace:
                show(ask(process, home, f"report {served}"), served, idle)
        for sock in socks:
            sock.close()
    finally:
        process.kill()
        process.wait(10)
        instance.remove()


if __name__ == "__main__":
    main()
