#!/usr/bin/env bash
# `make buildout` / `make test-buildout`: run the buildout route of README.rst
# as written, in a throw-away copy of the working tree, then check that
#   - bin/instance run loads our ZCML (permission and profile registered),
#   - bin/instance fg answers HTTP with a Zope page and takes admin:admin,
#   - the instance log has no errors,
#   - bin/test finds the tests and can import every test module.
# Exits non-zero with a message saying which step failed.
#
# Environment:
#   CHECK_BUILDOUT_DIR  build there and keep it; a second run reuses its venv
#                       and eggs (seconds instead of minutes).  Default: a
#                       temporary directory, removed unless the check fails.
#   BUILDOUT_PYTHON     the README's python3.11.
#   START_TIMEOUT       seconds to wait for the instance to answer (120).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${BUILDOUT_PYTHON:-python3.11}
start_timeout=${START_TIMEOUT:-120}
# Written into the work directory, so that a reused one is recognised and we
# never empty a directory we did not make (CHECK_BUILDOUT_DIR=. would be bad).
marker=.check-buildout
instance_pid=
ok=

fail() {
    echo "check_buildout: FAILED: $*" >&2
    exit 1
}

step() {
    echo "check_buildout: [$((SECONDS))s] $*"
}

# Show the end of a log, then fail.
fail_log() {
    local log=$1
    shift
    echo "---- last lines of $log" >&2
    tail -n 40 "$log" >&2 || true
    echo "----" >&2
    fail "$@"
}

stop_instance() {
    [ -n "$instance_pid" ] || return 0
    # bin/instance fg starts Zope as a child process: stop the whole group.
    kill -TERM -- "-$instance_pid" 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 -- "-$instance_pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$instance_pid" 2>/dev/null || true
    wait "$instance_pid" 2>/dev/null || true
    instance_pid=
}

cleanup() {
    stop_instance
    if [ -n "${CHECK_BUILDOUT_DIR:-}" ]; then
        echo "check_buildout: kept $work"
    elif [ -n "$ok" ]; then
        rm -rf "$work"
    else
        echo "check_buildout: left $work for inspection (logs in $work/check-logs)" >&2
    fi
}

command -v "$python" >/dev/null || fail "$python not found (the route needs Python 3.11)"

if [ -n "${CHECK_BUILDOUT_DIR:-}" ]; then
    mkdir -p "$CHECK_BUILDOUT_DIR"
    work=$(cd "$CHECK_BUILDOUT_DIR" && pwd)
    if [ -n "$(ls -A "$work")" ] && [ ! -e "$work/$marker" ]; then
        fail "$work is not empty and was not made by this script; not touching it"
    fi
    # Keep the venv and the buildout's eggs and parts, drop everything else
    # (sources from the last run, var/ with its Data.fs and logs).
    find "$work" -mindepth 1 -maxdepth 1 \
        ! -name "$marker" ! -name bin ! -name lib ! -name lib64 ! -name include \
        ! -name share ! -name pyvenv.cfg ! -name eggs ! -name develop-eggs \
        ! -name parts ! -name .installed.cfg -exec rm -rf {} +
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/streamguard-buildout.XXXXXX")
fi
touch "$work/$marker"
trap cleanup EXIT

# What a fresh clone has, plus uncommitted work, so the check covers what is
# about to be committed; ignored files (a local bin/, eggs/, .venv/) stay out.
step "copying the working tree of $repo to $work"
git -C "$repo" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
        # Deleted but not yet committed: a clone would not have it either.
        [ -e "$repo/$f" ] || continue
        mkdir -p "$work/$(dirname "$f")"
        cp -p "$repo/$f" "$work/$f"
    done
cd "$work"
mkdir -p check-logs

# The README route, as written.
step "$python -m venv ."
"$python" -m venv . >check-logs/venv.log 2>&1 || fail_log check-logs/venv.log "venv"

step "bin/pip install -r requirements-buildout.txt"
bin/pip install -r requirements-buildout.txt >check-logs/pip.log 2>&1 ||
    fail_log check-logs/pip.log "bin/pip install -r requirements-buildout.txt"

step "bin/buildout (a few minutes on a cold cache; log: check-logs/buildout.log)"
bin/buildout >check-logs/buildout.log 2>&1 || fail_log check-logs/buildout.log "bin/buildout"
# show-picked-versions lists what versions.cfg did not pin: the route must
# install exactly the tested versions.
if grep -q "Versions had to be automatically picked" check-logs/buildout.log; then
    sed -n '/Versions had to be automatically picked/,$p' check-logs/buildout.log >&2
    fail "bin/buildout picked versions that versions.cfg does not pin (listed above)"
fi

# The only change to the README's instance: a free loopback port, so the check
# can run next to `make run` or another check.
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "bin/buildout -N instance:http-address=127.0.0.1:$port"
bin/buildout -N "instance:http-address=127.0.0.1:$port" >check-logs/buildout-port.log 2>&1 ||
    fail_log check-logs/buildout-port.log "bin/buildout with the check's port"

# Before `fg`: `run` opens the same FileStorage, which allows one process.
# The add-on has no zcml = line in buildout.cfg, so this also proves that
# Plone finds it through its plone.autoinclude entry point.
step "bin/instance run: is collective.streamguard's ZCML loaded?"
cat >check-logs/zcml_check.py <<'PY'
import os
import sys

from AccessControl.Permission import getPermissions
from Products.GenericSetup.registry import _profile_registry
from zope.component import queryUtility
from zope.security.interfaces import IPermission

import collective.streamguard

# From the environment: `bin/instance run` does not pass arguments on as-is.
SRC = os.environ["STREAMGUARD_SRC"]
TITLE = "collective.streamguard: View log streams"
errors = []
if not collective.streamguard.__file__.startswith(SRC):
    errors.append(f"collective.streamguard comes from {collective.streamguard.__file__}, "
                  f"not the develop egg in {SRC}")
# permissions.zcml, included first by configure.zcml.
permission = queryUtility(IPermission, "collective.streamguard.ViewLogStreams")
if permission is None or permission.title != TITLE:
    errors.append(f"permission collective.streamguard.ViewLogStreams not registered "
                  f"with title {TITLE!r} (found {permission!r})")
# Five also gives Zope's own security machinery the permission.
if TITLE not in [p[0] for p in getPermissions()]:
    errors.append(f"Zope does not know the permission {TITLE!r}")
# profiles.zcml, included only where Products.CMFPlone is installed.
if _profile_registry.getProfileInfo("collective.streamguard:default") is None:
    errors.append("GenericSetup profile collective.streamguard:default not registered")
for error in errors:
    print("zcml_check:", error)
print("zcml_check:", "FAILED" if errors else "ok")
sys.exit(1 if errors else 0)
PY
STREAMGUARD_SRC=$work/src/ bin/instance run check-logs/zcml_check.py >check-logs/zcml_check.log 2>&1 ||
    fail_log check-logs/zcml_check.log "collective.streamguard's ZCML did not load as expected"
grep "^zcml_check:" check-logs/zcml_check.log

step "bin/instance fg on http://127.0.0.1:$port/"
# setsid: its own process group, so stop_instance reaches Zope's child too.
setsid bin/instance fg >check-logs/instance-fg.log 2>&1 &
instance_pid=$!
url=http://127.0.0.1:$port/
deadline=$((SECONDS + start_timeout))
code=000
while :; do
    kill -0 "$instance_pid" 2>/dev/null ||
        fail_log check-logs/instance-fg.log "bin/instance fg exited before answering"
    [ "$SECONDS" -lt "$deadline" ] ||
        fail_log check-logs/instance-fg.log "no answer on $url within ${start_timeout}s"
    # The recipe's fast-listen binds the port before Zope has loaded, so a
    # request may wait for the whole start-up: give it only the time left.
    code=$(curl -s --max-time $((deadline - SECONDS)) -o check-logs/root.html \
        -D check-logs/root.headers -w '%{http_code}' "$url") || code=000
    [ "$code" != 000 ] && break
    sleep 1
done
case $code in
    200 | 401) ;;
    *) fail_log check-logs/root.html "$url answered $code, not 200 or 401" ;;
esac
grep -qi "X-Powered-By: Zope" check-logs/root.headers ||
    fail_log check-logs/root.headers "$url does not say it is Zope (no X-Powered-By: Zope)"
admin=$(curl -s --max-time 30 -u admin:admin -o /dev/null -w '%{http_code}' "${url}manage_main") ||
    admin=000
[ "$admin" = 200 ] || fail "${url}manage_main answered $admin to admin:admin, not 200"
step "$url answered $code (Zope); admin:admin opens the ZMI"

stop_instance
# Zope logs failures at startup (a ZCML warning, an import error in a product)
# without refusing to serve, so read the logs too.
if grep -E " (ERROR|CRITICAL) |Traceback" check-logs/instance-fg.log var/log/instance.log; then
    fail "the instance logged errors (above)"
fi

step "bin/test --list-tests"
bin/test --list-tests >check-logs/test-list.log 2>&1 ||
    fail_log check-logs/test-list.log "bin/test --list-tests"
# zope.testrunner exits 0 even when a test module cannot be imported.
if grep -q "Test-module import failures" check-logs/test-list.log; then
    fail_log check-logs/test-list.log "bin/test cannot import some test modules"
fi
count=$(grep -c "(collective\.streamguard\.tests\." check-logs/test-list.log || true)
[ "$count" -gt 0 ] || fail_log check-logs/test-list.log "bin/test found no tests"
step "bin/test lists $count tests"

# The develop egg's optional C extension (_utf8.c) is built by buildout too.
step "bin/test -t test_utf8_check"
bin/test -t test_utf8_check >check-logs/test-utf8.log 2>&1 ||
    fail_log check-logs/test-utf8.log "bin/test -t test_utf8_check (the C UTF-8 check)"

ok=1
echo "check_buildout: OK: the buildout route works (${SECONDS}s)"
