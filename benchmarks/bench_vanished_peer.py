"""How long an idle stream lives after its client vanished without FIN or reset.

A real waitress in this process serves an idle guarded stream (it sends
nothing, or with ``--heartbeat`` only a heartbeat, as server-sent events
do) on one end of a veth pair; the client runs in a network namespace at
the other end (``ip netns``: run as root).  The client's link is then
taken down: no FIN, no reset, no packet ever again, as when a laptop
sleeps.  Measured: the time from the link going down to the stream's end,
with the keepalive settings the guard puts on every stream socket
(``collective.streamguard.connection.KEEPALIVE_*``, ``user_timeout_ms()``),
and the reason it ended with; for a heartbeat stream also when its first
heartbeat after the link went down was written (from there the unanswered
write, not keepalive, finds the peer gone).  Without these settings a quiet
stream would live until ``max_duration``, a beating one about 16 minutes
(the kernel's retransmissions).

Run from the repository root, as root::

    .venv/bin/python benchmarks/bench_vanished_peer.py --runs 3
    .venv/bin/python benchmarks/bench_vanished_peer.py --runs 3 --heartbeat 15 --text-runs 1

The second measures a stream with a 15 s heartbeat 3 times and, in the same
run for comparison, the quiet (text) stream once.
"""

import argparse
import statistics
import time

from collective.streamguard import connection
from collective.streamguard.tests import test_vanished_peer
from collective.streamguard.tests.helpers import wait_for


def measure(layer, heartbeat):
    """One run: (seconds from link down to the stream's end, its reason,
    seconds from link down to the first heartbeat written after it)."""
    case = test_vanished_peer.TestVanishedPeer(
        "test_every_stream_socket_gets_keepalive_within_a_minute"
    )
    case.heartbeat_interval = heartbeat
    case.setUp()
    try:
        case.start_client()
        assert wait_for(lambda: case.app.options)
        if heartbeat:
            # Down just after a heartbeat: the worst case, the next write
            # after the vanish is a whole interval later.
            beats = len(case.app.beats)
            assert wait_for(lambda: len(case.app.beats) > beats, timeout=heartbeat + 10)
        down = time.monotonic()
        layer.client_link("down")
        assert wait_for(lambda: case.app.ended, timeout=1200)
        ended = time.monotonic() - down
        after = [beat - down for beat in case.app.beats if beat > down]
        return ended, case.app.ended[0], after[0] if after else None
    finally:
        case.doCleanups()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the stream sends a heartbeat this often (as server-sent events)",
    )
    parser.add_argument(
        "--text-runs",
        type=int,
        default=None,
        help="runs of the quiet (text) stream in the same run "
        "(default: --runs without --heartbeat, else 0)",
    )
    args = parser.parse_args()
    text_runs = args.text_runs
    if text_runs is None:
        text_runs = 0 if args.heartbeat else args.runs
    cases = []
    if args.heartbeat:
        cases += [args.heartbeat] * args.runs
    cases += [None] * text_runs
    layer = test_vanished_peer.ClientNamespaceLayer
    layer.setUp()
    results = []
    try:
        for heartbeat in cases:
            results.append((heartbeat, *measure(layer, heartbeat)))
    finally:
        layer.tearDown()
    print(
        f"# keepalive idle {connection.KEEPALIVE_IDLE} s, interval "
        f"{connection.KEEPALIVE_INTERVAL} s, count {connection.KEEPALIVE_COUNT}; "
        f"bound {connection.VANISHED_PEER_BOUND} s"
    )
    print(
        f"{'stream':>16} {'user timeout':>12} {'run':>4} {'heartbeat after s':>17} "
        f"{'ended after s':>14}  reason"
    )
    runs = {}
    for heartbeat, seconds, reason, beat in results:
        kind = f"heartbeat {heartbeat:g} s" if heartbeat else "text (quiet)"
        runs.setdefault(kind, []).append(seconds)
        timeout = connection.user_timeout_ms(heartbeat) / 1000
        print(
            f"{kind:>16} {timeout:>10.0f} s {len(runs[kind]):>4} "
            f"{'-' if beat is None else f'{beat:.1f}':>17} {seconds:>14.1f}  {reason}"
        )
    for kind, seconds in runs.items():
        print(f"{kind}: median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s")


if __name__ == "__main__":
    main()
