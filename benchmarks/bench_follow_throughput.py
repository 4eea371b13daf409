"""Catch-up throughput: ``@@stream-log`` sending a large log from its start.

Run from the repository root (after ``make test`` or ``make run`` made .venv):

    .venv/bin/python benchmarks/bench_follow_throughput.py [--size 1GiB] [--runs 3]

Two logs of ``--size`` bytes (default 1 GiB) are generated in a temporary
directory, each ending with the end marker line, and read once so that every
measurement reads from the page cache:

- typical: Zope event-log lines of 60-250 bytes, ASCII, 2 % of them with
  some UTF-8 text (a title with umlauts, a euro sign);
- dense UTF-8: every line holds several non-ASCII characters (the worst
  case for the UTF-8 check the stream must make).

For each log, ``--runs`` times, in turn, a raw socket client on loopback
reads the whole response (``recv_into`` a 1 MiB buffer, discarding it):

(b)  the file from waitress as ``environ['wsgi.file_wrapper'](file)`` with a
     Content-Length: the reference of the issue, sent by waitress' I/O
     thread straight from the file;
(z)  ``@@stream-log?log=event&offset=0`` on a real Zope (``runwsgi``, its
     waitress with the defaults: 4 threads), the log being the instance's
     event log: text/plain, chunked, until the end marker;
(z') the same with ``format=sse`` (an event per 64 KiB, id = byte offset);
(g)  the same producer as (z) without Zope's publisher: ``GuardedStream``
     around ``LogStream(LogFollower(...))`` in a bare WSGI app on waitress;
(o)  for comparison, the follower's pieces yielded the ordinary way
     (64 KiB pieces through waitress' task, copied into its buffers): what
     the stream did before it handed large chunks to waitress' I/O thread;
(f)  ``LogFollower.read()`` alone, 1 MiB pieces, nothing sent.

The (b) and (g)/(o) apps run in one waitress subprocess
(``waitress.create_server`` defaults), the Zope instance in another; only
one request runs at a time.  MB/s is file bytes (10^6) per second, from
sending the request to the end of the response.  Cells are the median of
the runs (best in brackets); ratios are of the medians, measured side by
side in the same run.  CPU is the seconds (user + system, from /proc) the
serving process and the client used per GiB, medians: on a machine with
few cores their sum bounds the throughput.  The issue's target:
(z)/(b) >= 0.8.  Nothing is asserted.
"""

import argparse
import base64
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

from collective.streamguard.connection import client_connection
from collective.streamguard.guard import GuardedStream
from collective.streamguard.guard import StreamGuard
from collective.streamguard.logs.follower import END_MARKER
from collective.streamguard.logs.follower import LogFollower
from collective.streamguard.logs.stream import TEXT_PIECE
from collective.streamguard.logs.stream import LogStream
from collective.streamguard.logs.stream import piece_size

UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
UNITS.update(k=10**3, m=10**6, g=10**9, kib=2**10, mib=2**20, gib=2**30)
ADMIN = ("admin", "secret")


def parse_size(text):
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


# -- the logs -----------------------------------------------------------------

WORDS = "request user catalog reindex portal_catalog waitress ZODB traversal".split()
UTF8_WORDS = ["größe", "Übersicht", "€ 12,50", "naïve café", "日本語", "😀"]
LEVELS = ["INFO", "INFO", "INFO", "DEBUG", "WARNING", "ERROR"]


def log_block(rng, utf8_share, dense):
    lines = []
    for n in range(40_000):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 25))]
        if dense:
            for _ in range(3):
                words.insert(rng.randrange(len(words) + 1), rng.choice(UTF8_WORDS))
        elif rng.random() < utf8_share:
            words.append(rng.choice(UTF8_WORDS))
        lines.append(
            f"2026-11-21 00:{n // 600 % 60:02d}:{n // 10 % 60:02d},{n % 1000:03d} "
            f"{rng.choice(LEVELS)} [Zope.SiteErrorLog:{n % 400}] {' '.join(words)}\n"
        )
    return "".join(lines).encode("utf-8")


def generate(path, size, dense):
    """``size`` bytes of whole lines, then the end marker line."""
    block = log_block(random.Random(1), 0.02, dense)
    with open(path, "wb") as file:
        written = 0
        while written < size:
            chunk = block[: size - written]
            chunk = chunk[: chunk.rfind(b"\n") + 1] or block[: block.index(b"\n") + 1]
            file.write(chunk)
            written += len(chunk)
        file.write(END_MARKER.encode() + b"\n")
    return written


def warm(path):
    with open(path, "rb", buffering=0) as file:
        buffer = bytearray(1 << 20)
        while file.readinto(buffer):
            pass


# -- the bare waitress server (b), (g), (o) -----------------------------------


def make_app(path):
    def app(environ, start_response):
        target = environ["PATH_INFO"]
        if target == "/file":
            file = open(path, "rb")
            size = os.fstat(file.fileno()).st_size
            start_response(
                "200 OK",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(size)),
                ],
            )
            return environ["wsgi.file_wrapper"](file)
        start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
        if target == "/guarded":
            follower = LogFollower(path, offset=0, max_piece=piece_size(False))
            follower.open()
            guard = StreamGuard(client_connection(environ))
            return GuardedStream(LogStream(follower, False), guard, label="bench")
        follower = LogFollower(path, offset=0, max_piece=65536)
        follower.open()
        return ordinary(follower)

    return app


def ordinary(follower):
    try:
        while not follower.ended:
            for piece in follower.read():
                yield piece.data
    finally:
        follower.close()


def serve(path):
    import waitress

    server = waitress.create_server(make_app(path), host="127.0.0.1", port=0)
    print(server.effective_port, flush=True)
    server.run()


def start_bare(path):
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", path],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    return process, int(process.stdout.readline())


# -- the Zope instance (z) ----------------------------------------------------


def start_zope(log_path):
    """A throw-away Zope with the add-on whose event log is ``log_path``."""
    from collective.streamguard.tests.servers import executable
    from collective.streamguard.tests.servers import free_port
    from collective.streamguard.tests.zopeinstance import ZopeInstance

    port = free_port()
    instance = ZopeInstance(port)
    shutil.move(log_path, instance.event_log)
    env = dict(os.environ, **instance.env)
    subprocess.run(
        [executable("addzopeuser"), "-c", instance.zope_conf, *ADMIN],
        env=env,
        check=True,
        capture_output=True,
    )
    process = subprocess.Popen(
        [executable("runwsgi"), instance.zope_ini],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return instance, process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("runwsgi did not answer")


# -- the client ---------------------------------------------------------------


def fetch(port, target, auth=False):
    """(seconds, bytes) to receive the whole response to ``GET target``."""
    buffer = bytearray(1 << 20)
    received = 0
    headers = f"GET {target} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
    if auth:
        token = base64.b64encode(":".join(ADMIN).encode()).decode()
        headers += f"Authorization: Basic {token}\r\n"
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall((headers + "\r\n").encode())
        while n := sock.recv_into(buffer):
            received += n
    return time.monotonic() - start, received


def process_cpu(pid):
    """CPU seconds (user + system) the process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def follower_alone(path):
    start = time.monotonic()
    sent = 0
    with LogFollower(path, offset=0, max_piece=TEXT_PIECE) as follower:
        while not follower.ended:
            for piece in follower.read():
                sent += len(piece.data)  # what a text stream sends
    return time.monotonic() - start


ROWS = {
    "file": "(b)  waitress, wsgi.file_wrapper",
    "zope": "(z)  Zope @@stream-log, text",
    "zope-sse": "(z') Zope @@stream-log, server-sent events",
    "guarded": "(g)  waitress, GuardedStream(LogStream), text",
    "ordinary": "(o)  waitress, 64 KiB pieces the ordinary way",
    "alone": "(f)  LogFollower.read() alone",
}


def measure(kind, size, runs, directory):
    path = os.path.join(directory, f"{kind}.log")
    written = generate(path, size, dense=kind == "dense UTF-8")
    warm(path)
    bare, bare_port = start_bare(path)
    zope_log = os.path.join(directory, f"{kind}-zope.log")
    shutil.copyfile(path, zope_log)
    instance, zope, zope_port = start_zope(zope_log)
    warm(instance.event_log)
    rates = {name: [] for name in ROWS}
    cpu = {name: [] for name in ROWS}  # (server, client) CPU seconds per run
    wire = {}
    try:
        for _ in range(runs):
            for name in ROWS:
                server = zope if name.startswith("zope") else bare
                server_cpu, client_cpu = process_cpu(server.pid), time.process_time()
                if name == "alone":
                    server_cpu = process_cpu(os.getpid())
                    elapsed, received = follower_alone(path), written
                elif name.startswith("zope"):
                    query = "log=event&offset=0" + ("&format=sse" if name == "zope-sse" else "")
                    elapsed, received = fetch(zope_port, f"/@@stream-log?{query}", auth=True)
                else:
                    elapsed, received = fetch(bare_port, f"/{name}")
                client_cpu = time.process_time() - client_cpu
                server_cpu = (
                    process_cpu(os.getpid() if name == "alone" else server.pid) - server_cpu
                )
                if received < written:
                    raise RuntimeError(f"{name}: {received} bytes for {written}")
                rates[name].append(written / elapsed)
                cpu[name].append((server_cpu, 0.0 if name == "alone" else client_cpu))
                wire[name] = received
    finally:
        for process in (bare, zope):
            process.terminate()
            process.wait()
        instance.remove()
        os.unlink(path)
    return written, rates, cpu, wire


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=2**30, help="e.g. 1GiB, 200MB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)

    print(
        f"Python {platform.python_version()}, waitress {version('waitress')}, "
        f"Zope {version('Zope')}, Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"loopback; median of {args.runs} runs (best)"
    )
    with tempfile.TemporaryDirectory() as directory:
        for kind in ("typical", "dense UTF-8"):
            written, rates, cpu, wire = measure(kind, args.size, args.runs, directory)
            print(f"\n{kind} log: {written:,} bytes")
            header = (
                f"{'':<48} {'MB/s':>14} {'ratio to (b)':>13} "
                f"{'CPU s/GiB: server':>18} {'client':>7}"
            )
            print(header)
            print("-" * len(header))
            reference = statistics.median(rates["file"])
            gib = written / 2**30
            for name, label in ROWS.items():
                median = statistics.median(rates[name])
                cell = f"{median / 1e6:6.0f} ({max(rates[name]) / 1e6:.0f})"
                server_cpu = statistics.median(c[0] for c in cpu[name]) / gib
                client_cpu = statistics.median(c[1] for c in cpu[name]) / gib
                print(
                    f"{label:<48} {cell:>14} {median / reference:13.2f} "
                    f"{server_cpu:18.2f} {client_cpu:7.2f}"
                )
            print(
                f"on the wire: (z) {wire['zope']:,} bytes (chunked), "
                f"(z') {wire['zope-sse']:,} bytes (events)"
            )
    print("\nthe issue's target: (z)/(b) >= 0.8")


if __name__ == "__main__":
    main()
