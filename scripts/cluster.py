"""`make cluster`: a ZEO server, N Zope instances as its clients, HAProxy in front,
and (``--workers N``) Redis and N ``streamguard-worker`` processes.

Renders the configurations into ``--directory`` (``cluster/``) from the
templates in ``etc/``: ``zeo.conf.in`` (runzeo, its data in ``VAR/zeo/``),
per instance ``zope-zeo.conf.in`` (a ZEO client named ``instanceN`` for
``@@stream-status``) and ``zope.ini.in`` (`make run`'s, with the instance's
own port and ``VAR/cluster/instanceN/log/``, trusting the balancer's
X-Forwarded-For), and ``haproxy.cfg.in``.  With workers (``--workers N``,
`make cluster WORKERS=N`): ``redis.conf.in`` (a new password every run), per
worker ``zope-zeo.conf.in`` again (``workerN``, a ZEO client of its own), and
``worker-broker``/``worker-secret`` in every instance's and worker's
zope.conf.  Then it starts runzeo (and Redis), creates or updates the site on
the ZEO storage as `make run` does (``scripts/create_site.py``), starts the
instances, the workers and HAProxy, prints the URLs and waits; Ctrl-C (or
SIGTERM) stops HAProxy, then the instances (SIGTERM: their streams end
cleanly, their worker jobs are cancelled), then the workers, then Redis and
ZEO.

``--check``: stop as soon as the site answers 200 through the balancer, every
instance names itself and lists every worker as up in ``@@stream-status``
(`make test-cluster`, CI).  A port of 0 is any free port.

The tests (``collective.streamguard.tests.cluster``) render HAProxy's
configuration with ``haproxy_config`` and the instances' proxy settings
with ``PROXY_SETTINGS`` from here.
"""

import argparse
import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")

#: waitress' settings of an instance behind the balancer on ``host``: it
#: takes the client's address from the balancer's X-Forwarded-For, the last
#: entry (the one the balancer added), and drops the header from anybody else.
PROXY_SETTINGS = """\
trusted_proxy = {host}
trusted_proxy_headers = x-forwarded-for
trusted_proxy_count = 1
clear_untrusted_proxy_headers = true
"""
#: The line of zope.ini.in that PROXY_SETTINGS replaces.
UNTRUSTED_LINE = "clear_untrusted_proxy_headers = false\n"


def render(template, values):
    """The text of ``etc/<template>`` with ``@NAME@`` replaced by ``values[NAME]``."""
    with open(os.path.join(ETC, template)) as f:
        text = f.read()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    return text


def haproxy_config(bind, instances, threads):
    """HAProxy's configuration (etc/haproxy.cfg.in) for ``instances``, a list
    of ``(name, "host:port")``, listening on ``bind`` ("host:port")."""
    pages = "\n".join(f"    server {name} {address}" for name, address in instances)
    streams = "\n".join(
        f"    server {name} {address} track pages/{name}" for name, address in instances
    )
    return render(
        "haproxy.cfg.in",
        {"BIND": bind, "THREADS": threads, "PAGE_SERVERS": pages, "STREAM_SERVERS": streams},
    )


def instance_ini(var, host, port, threads):
    """zope.ini of an instance behind the balancer (on ``host``)."""
    text = render(
        "zope.ini.in",
        {"INSTANCE": "", "VAR": var, "HOST": host, "PORT": port, "THREADS": threads},
    )
    if UNTRUSTED_LINE not in text:
        raise SystemExit(f"etc/zope.ini.in has no line {UNTRUSTED_LINE.strip()!r} to replace")
    return text.replace(UNTRUSTED_LINE, PROXY_SETTINGS.format(host=host))


def free_port(host):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def write(path, text, mode=0o644):
    """``path`` with ``text``, readable by ``mode`` (0o600 for secrets)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(descriptor, mode)
    with open(descriptor, "w") as f:
        f.write(text)


#: What zope-zeo.conf.in's ``@WORKER_SETTINGS@`` becomes with workers.
WORKER_SETTINGS = """  worker-broker redis://:{password}@{host}:{port}/0
  worker-secret {secret}
"""


class Cluster:
    def __init__(self, args):
        self.args = args
        self.host = args.host
        self.port = args.port or free_port(self.host)
        zeo_port = args.zeo_port or free_port(self.host)
        self.zeo = f"{self.host}:{zeo_port}"
        self.directory = os.path.abspath(args.directory)
        self.var = os.path.abspath(args.var)
        self.processes = []  # (name, Popen), in start order
        self.instances = []  # (name, port, etc directory, var directory)
        #: (name, etc directory, var directory) of each worker process.
        self.workers = [
            (
                f"worker{n}",
                os.path.join(self.directory, f"worker{n}"),
                os.path.join(self.var, "cluster", f"worker{n}"),
            )
            for n in range(1, args.workers + 1)
        ]
        self.redis_port = (args.redis_port or free_port(self.host)) if self.workers else None
        for n in range(1, args.instances + 1):
            port = self.port + n if args.port else free_port(self.host)
            self.instances.append(
                (
                    f"instance{n}",
                    port,
                    os.path.join(self.directory, f"instance{n}"),
                    os.path.join(self.var, "cluster", f"instance{n}"),
                )
            )

    def configure(self):
        os.makedirs(os.path.join(self.var, "zeo", "blobstorage"), exist_ok=True)
        self.zeo_conf = os.path.join(self.directory, "zeo", "zeo.conf")
        write(self.zeo_conf, render("zeo.conf.in", {"VAR": self.var, "ZEO": self.zeo}))
        worker_settings = ""
        if self.workers:
            # New every run: only these files (mode 0600) hold them.
            password = secrets.token_hex(24)
            worker_settings = WORKER_SETTINGS.format(
                password=password,
                host=self.host,
                port=self.redis_port,
                secret=secrets.token_hex(32),
            )
            os.makedirs(os.path.join(self.var, "redis"), exist_ok=True)
            self.redis_conf = os.path.join(self.directory, "redis", "redis.conf")
            write(
                self.redis_conf,
                render(
                    "redis.conf.in",
                    {
                        "HOST": self.host,
                        "PORT": self.redis_port,
                        "PASSWORD": password,
                        "VAR": os.path.join(self.var, "redis"),
                    },
                ),
                mode=0o600,
            )
        zope_processes = [(name, home, var) for name, _, home, var in self.instances]
        for name, home, var in zope_processes + self.workers:
            for sub in ("log", "cache", "blobcache"):
                os.makedirs(os.path.join(var, sub), exist_ok=True)
            write(
                os.path.join(home, "etc", "zope.conf"),
                render(
                    "zope-zeo.conf.in",
                    {
                        "INSTANCE": home,
                        "VAR": var,
                        "ZEO": self.zeo,
                        "NAME": name,
                        "WORKER_SETTINGS": worker_settings,
                    },
                ),
                mode=0o600,
            )
            with open(os.path.join(ETC, "site.zcml")) as f:
                write(os.path.join(home, "etc", "site.zcml"), f.read())
        for _name, port, home, var in self.instances:
            write(
                os.path.join(home, "etc", "zope.ini"),
                instance_ini(var, self.host, port, self.args.threads),
            )
        self.haproxy_cfg = os.path.join(self.directory, "haproxy.cfg")
        write(
            self.haproxy_cfg,
            haproxy_config(
                f"{self.host}:{self.port}",
                [(name, f"{self.host}:{port}") for name, port, _, _ in self.instances],
                self.args.threads,
            ),
        )

    def start(self, name, command, log):
        with open(log, "ab") as output:
            # Its own session: Ctrl-C reaches this script only, which stops
            # the processes in order.
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append((name, process, log))
        return process

    def wait_ready(self, name, process, log, port, path=None, timeout=120.0):
        """Until ``port`` accepts (``path``: answers it with 200); exits if the
        process dies or the deadline passes.  Nothing tells of readiness but
        the port: ask every 100 ms."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.fail(f"{name} exited with {process.returncode}", log)
            try:
                if path is None:
                    socket.create_connection((self.host, port), timeout=2).close()
                    return
                connection = http.client.HTTPConnection(self.host, port, timeout=30)
                try:
                    connection.request("GET", path)
                    if connection.getresponse().status == 200:
                        return
                finally:
                    connection.close()
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        self.fail(f"{name} did not answer on port {port} within {timeout:.0f} s", log)

    def wait_logged(self, name, process, log, text, timeout=120.0):
        """Until ``log`` has ``text`` (a worker says it serves: nothing else
        tells); exits if the process dies or the deadline passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.fail(f"{name} exited with {process.returncode}", log)
            try:
                with open(log, "rb") as f:
                    if text.encode() in f.read():
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.fail(f"{name} did not log {text!r} within {timeout:.0f} s", log)

    def fail(self, message, log):
        print(f"make cluster: {message}; the end of {log}:", file=sys.stderr)
        try:
            with open(log, "rb") as f:
                sys.stderr.write(f.read()[-3000:].decode("utf-8", "replace"))
        except OSError:
            pass
        raise SystemExit(1)

    def run(self):
        bin_ = os.path.abspath(self.args.bin)
        site = os.environ.get("SITE_ID", "Plone")
        self.configure()
        zeo_log = os.path.join(self.var, "zeo", "runzeo.out")
        zeo = self.start("zeo", [os.path.join(bin_, "runzeo"), "-C", self.zeo_conf], zeo_log)
        self.wait_ready("runzeo", zeo, zeo_log, int(self.zeo.rsplit(":", 1)[1]))
        if self.workers:
            redis_log = os.path.join(self.var, "redis", "redis.log")
            redis_command = shutil.which("redis-server") or "/usr/bin/redis-server"
            redis = self.start("redis", [redis_command, self.redis_conf], redis_log)
            self.wait_ready("redis-server", redis, redis_log, self.redis_port)
        first = self.instances[0]
        print(f"Creating or updating the site /{site} on ZEO {self.zeo}", flush=True)
        created = subprocess.run(
            [
                os.path.join(bin_, "zconsole"),
                "run",
                os.path.join(first[2], "etc", "zope.conf"),
                os.path.join(ROOT, "scripts", "create_site.py"),
            ]
        )
        if created.returncode:
            raise SystemExit(f"make cluster: scripts/create_site.py failed ({created.returncode})")
        for name, _port, home, var in self.instances:
            log = os.path.join(var, "log", "console.log")
            self.start(
                name, [os.path.join(bin_, "runwsgi"), os.path.join(home, "etc", "zope.ini")], log
            )
        for name, home, var in self.workers:
            log = os.path.join(var, "log", "worker.log")
            command = [
                os.path.join(bin_, "streamguard-worker"),
                os.path.join(home, "etc", "zope.conf"),
            ]
            self.start(name, [*command, "--name", name], log)
        by_name = {name: (process, log) for name, process, log in self.processes}
        for name, port, _, _ in self.instances:
            self.wait_ready(name, *by_name[name], port, path=f"/{site}")
        for name, _, _ in self.workers:
            self.wait_logged(name, *by_name[name], "serves jobs")
        # Debian puts it in /usr/sbin, which a user's PATH may not have.
        haproxy_command = shutil.which("haproxy") or "/usr/sbin/haproxy"
        checked = subprocess.run([haproxy_command, "-c", "-q", "-f", self.haproxy_cfg])
        if checked.returncode:
            raise SystemExit(f"make cluster: HAProxy refused {self.haproxy_cfg}")
        haproxy_log = os.path.join(self.var, "cluster", "haproxy.log")
        # -db: in the foreground, stopped by us.
        haproxy = self.start(
            "haproxy", [haproxy_command, "-db", "-f", self.haproxy_cfg], haproxy_log
        )
        self.wait_ready("haproxy", haproxy, haproxy_log, self.port, path=f"/{site}")
        self.report(site)

    def report(self, site):
        base = f"http://{self.host}:{self.port}/{site}"
        print()
        print(f"  Plone site (HAProxy):  {base}")
        user = os.environ.get("ADMIN_USER", "admin")
        print(f"  Login:                 {user} / {os.environ.get('ADMIN_PASSWORD', 'admin')}")
        print(f"  Live logs:             {base}/@@stream-log-viewer")
        print(f"  ZEO server:            {self.zeo}  (data in {self.var}/zeo)")
        for name, port, _, var in self.instances:
            print(f"  {name + ':':<22} http://{self.host}:{port}/{site}  (logs in {var}/log)")
        if self.workers:
            print(f"  Redis (the broker):    {self.host}:{self.redis_port}  (run_on='worker')")
        for name, _, var in self.workers:
            print(f"  {name + ':':<22} streamguard-worker  (log in {var}/log/worker.log)")
        print(f"  Configurations:        {self.directory}")
        print()
        sys.stdout.flush()

    def wait(self):
        """Until Ctrl-C or SIGTERM, or a process exits."""
        stop = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, frame: stop.append(signum))
        print("Ctrl-C stops the cluster.", flush=True)
        while not stop:
            for name, process, log in self.processes:
                if process.poll() is not None:
                    print(f"make cluster: {name} exited with {process.returncode} (see {log})")
                    return 1
            # signal.pause() would miss a child's exit; a child is looked at
            # twice a second.
            time.sleep(0.5)
        return 0

    def stop(self):
        """HAProxy first (no new requests), then the instances (SIGTERM ends
        their streams cleanly and cancels their worker jobs), then the
        workers, then Redis and ZEO."""
        rank = {"haproxy": 0, "redis": 3, "zeo": 3}
        rank.update((name, 2) for name, _, _ in self.workers)
        for group in (0, 1, 2, 3):
            members = [(n, p) for n, p, _ in self.processes if rank.get(n, 1) == group]
            for _, process in members:
                if process.poll() is None:
                    process.terminate()
            for name, process in members:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    print(f"make cluster: {name} did not stop within 60 s; killed")
                    process.kill()
                    process.wait(10)
        if self.processes:
            print("Stopped the cluster.")

    def status(self, port):
        """(HTTP status, body) of ``@@stream-status?format=json`` on ``port``."""
        user = os.environ.get("ADMIN_USER", "admin")
        password = os.environ.get("ADMIN_PASSWORD", "admin")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        connection = http.client.HTTPConnection(self.host, port, timeout=30)
        try:
            connection.request(
                "GET",
                "/@@stream-status?format=json",
                headers={"Authorization": f"Basic {token}"},
            )
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def check(self, timeout=60.0):
        """Every instance names itself in @@stream-status (zope.conf's
        instance-name) and lists every worker as up (a worker says so
        within a second of serving); exits if one does not."""
        workers = sorted(name for name, _, _ in self.workers)
        for name, port, _, _ in self.instances:
            deadline = time.monotonic() + timeout
            while True:
                status, body = self.status(port)
                answer = json.loads(body) if status == 200 else {}
                up = sorted((answer.get("workers") or {}).get("up") or [])
                if answer.get("instance") == name and up == workers:
                    break
                if time.monotonic() >= deadline or answer.get("instance") != name:
                    raise SystemExit(
                        f"make test-cluster: {name}'s @@stream-status answered "
                        f"{status}, workers up {up} (wanted {workers}): {body[:300]!r}"
                    )
                time.sleep(0.2)
        print(
            "make test-cluster: the site answers through HAProxy; every instance names "
            f"itself and sees {len(workers)} worker(s) up."
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", required=True, help="the virtualenv's bin/")
    parser.add_argument("--directory", required=True, help="where the configurations go")
    parser.add_argument("--var", required=True, help="where the data and logs go")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="HAProxy's; 0: any free port")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--zeo-port", type=int, default=8100)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--workers", type=int, default=1, help="streamguard-worker processes (0: no Redis either)"
    )
    parser.add_argument("--redis-port", type=int, default=8101, help="the workers' broker's")
    parser.add_argument("--check", action="store_true", help="stop once the site answers")
    args = parser.parse_args()
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    cluster = Cluster(args)
    status = 0
    try:
        cluster.run()
        if args.check:
            cluster.check()
        else:
            status = cluster.wait()
    except KeyboardInterrupt:
        status = 130
    finally:
        cluster.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
