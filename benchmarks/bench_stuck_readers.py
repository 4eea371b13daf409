"""Viewers that stop reading: what each costs the server, next to asyncio.

A real Zope (the server of ``bench_parked_streams.py``: ``runwsgi``,
waitress with 4 threads, ``asyncore_use_poll``) serves N
``@@stream-log?log=app&format=sse`` viewers whose clients never read after
the first event (receive buffer 4 KiB).  Then MiB of log lines are
appended (100-byte lines, ``--mib``), in 1 MiB writes, and the server's
RSS growth per stuck viewer is reported once it has stopped growing; the
same for one reading viewer (the shared frames are not a stuck viewer's).
The kernel's send buffer of each socket is the kernel's, not in RSS.

Side by side, the stdlib asyncio server of ``bench_parked_streams.py``,
which writes every event to every client's transport without a bound.

Run from the repository root, after ``make install-test``::

    .venv/bin/python benchmarks/bench_stuck_readers.py [--counts 50,200] [--mib 8]

Nothing is asserted.
"""

import argparse
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_parked_streams import ASYNCIO_SERVER  # noqa: E402
from bench_parked_streams import HOST  # noqa: E402
from bench_parked_streams import ZOPE_HEADERS  # noqa: E402
from bench_parked_streams import ZOPE_PATH  # noqa: E402
from bench_parked_streams import free_port  # noqa: E402
from bench_parked_streams import rss_and_fds  # noqa: E402
from bench_parked_streams import start_zope  # noqa: E402
from bench_parked_streams import wait_until_serving  # noqa: E402
from bench_parked_streams import zope_instance  # noqa: E402

LINE = b"x" * 99 + b"\n"


def open_stuck(port, path, headers, count):
    """``count`` viewers with a 4 KiB receive buffer that read their first
    event, then nothing."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
        sock.settimeout(30)
        data = b""
        while b"retry:" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"refused: {data[:40]!r}")
            data += chunk
        socks.append(sock)
    return socks


def settled_rss(pid, seconds=60):
    """The RSS once it has not changed for 2 s (or after ``seconds``)."""
    last, since = None, time.monotonic()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rss = rss_and_fds(pid)[0]
        if rss != last:
            last, since = rss, time.monotonic()
        elif time.monotonic() - since > 2:
            break
        time.sleep(0.2)
    return last


def measure(kind, count, mib):
    port = free_port()
    if kind == "zope":
        instance, log_path, env = zope_instance(port, count + 50)
        process = start_zope(instance, env)
        path, headers = ZOPE_PATH, ZOPE_HEADERS
        cleanup = instance.remove
    else:
        home = tempfile.mkdtemp(prefix="streamguard-asyncio-")
        log_path = os.path.join(home, "app.log")
        open(log_path, "a").close()
        process = subprocess.Popen(
            [sys.executable, "-c", ASYNCIO_SERVER, log_path, str(port), os.devnull],
            stdout=subprocess.PIPE,
        )
        process.stdout.readline()
        path, headers = "/events", ""
        cleanup = lambda: subprocess.run(["rm", "-rf", home])  # noqa: E731
    try:
        if kind == "zope":
            wait_until_serving(port, process)
        socks = open_stuck(port, path, headers, count)
        time.sleep(1)
        before = settled_rss(process.pid)
        with open(log_path, "ab") as f:
            for _ in range(mib):
                f.write(LINE * ((1 << 20) // len(LINE)))
                f.flush()
        after = settled_rss(process.pid)
        for sock in socks:
            sock.close()
        return (after - before) / count
    finally:
        process.kill()
        process.wait(10)
        cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="50,200")
    parser.add_argument("--mib", type=int, default=8)
    parser.add_argument("--servers", default="zope,asyncio")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# {args.mib} MiB appended in 100-byte lines; viewers never read (4 KiB buffer)")
    print(f"{'server':<8} {'N':>5} {'KiB per stuck viewer':>21}")
    for count in (int(c) for c in args.counts.split(",")):
        for kind in args.servers.split(","):
            per = measure(kind, count, args.mib)
            print(f"{kind:<8} {count:>5} {per / 1024:>21.1f}", flush=True)


if __name__ == "__main__":
    main()
