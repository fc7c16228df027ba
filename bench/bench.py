#!/usr/bin/env python3
"""Side-by-side benchmark driver: bearer-proxy vs nginx (static header) vs Envoy (OAuth2
credential injector), all on 127.0.0.1. Started by bench/run, which installs the tools,
builds bearer-proxy and cleans up; this script starts and stops every server itself too.

Phases, in order (every proxy is started once and kept for the whole run, so the issuer's
counters are the token requests of the whole run):
  1. sanity: each target answers /auth with the Authorization header the upstream saw
  2. idle:   RSS of each proxy with N idle keep-alive connections open
  3. load:   wrk at each connection count, alternating rounds over the targets
  4. stream: a large download and uploads through each target, seconds and RSS growth;
             uploads go to two sinks: the nginx upstream (buffers the whole body before it
             answers) and bench/upload_sink.py (discards the body as fast as it arrives)
  5. tokens: token requests each proxy made (the issuer's per-client counter)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
TARGET_ORDER = ["direct", "bearer-proxy", "nginx", "envoy"]
PROXIES = ["bearer-proxy", "nginx", "envoy"]
DESCRIPTIONS = {
    "direct": "nginx upstream, no proxy (client sends a static Authorization header itself)",
    "bearer-proxy": "bearer-proxy, OAuth2 client-credentials token from the bench issuer",
    "nginx": "nginx reverse proxy adding a static Authorization header, keepalive 64 pool",
    "envoy": "Envoy with envoy.filters.http.credential_injector + "
             "envoy.http.injected_credentials.oauth2 against the bench issuer",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes

class Procs:
    """Every process this script starts; pids also go to a file bench/run's trap reads."""

    def __init__(self, pidfile: str):
        self.pidfile = pidfile
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], logpath: str, env=None) -> subprocess.Popen:
        out = open(logpath, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env)
        out.close()
        record_pid(self.pidfile, p.pid)
        self.procs.append((name, p))
        OURS.append(p)
        log(f"started {name} (pid {p.pid})")
        return p

    def stop_all(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # its own group: nginx workers too
                except ProcessLookupError:
                    pass
        deadline = time.time() + 8
        for name, p in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        self.procs.clear()


PIDFILE: str | None = None


def record_pid(pidfile: str | None, pid: int) -> None:
    """Appends "PID STARTTIME" for bench/run's trap, which kills the process group only
    while that pid still is this process (pids get reused)."""
    if not pidfile:
        return
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return  # already gone
    with open(pidfile, "a") as f:
        f.write(f"{pid} {start}\n")


def run_bounded(argv: list[str], limit: float) -> subprocess.CompletedProcess:
    """Runs a load or transfer command (wrk, curl) under `timeout`, in a process group of
    its own that is recorded for bench/run's trap, and killed whole if this script is
    interrupted or the command outlives `limit` seconds."""
    argv = ["timeout", "-k", "5", str(int(limit))] + argv
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    record_pid(PIDFILE, p.pid)
    try:
        out, err = p.communicate(timeout=limit + 15)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with status {proc.returncode}")
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s (last error: {last})")


def children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def system_ticks() -> tuple[int, int, int]:
    """All CPUs' (process time user+nice+system, irq+softirq, steal), in clock ticks.
    Interrupt time is kept apart: loopback traffic's softirq work is ours but not
    charged to any process."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    return v[0] + v[1] + v[2], v[5] + v[6], v[7]


OURS: list[subprocess.Popen] = []  # every server this script started (for CPU accounting)


def our_ticks() -> int:
    pids = []
    for p in OURS:
        if p.poll() is None:
            pids += [p.pid] + children(p.pid)
    self_t = os.times()
    return cpu_ticks(pids) + int((self_t.user + self_t.system) * CLK_TCK)


def children_cpu_ticks() -> int:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped descendants: wrk, curl
    return int((r.ru_utime + r.ru_stime) * CLK_TCK)


class CpuWatch:
    """CPU used during a phase: by the target, and by processes that are not the
    benchmark's (other work on the machine skews the numbers; this shows how much)."""

    def __init__(self, target_pids):
        self.target_pids = target_pids

    def __enter__(self):
        self.t0 = time.time()
        self.sys0, self.ours0, self.kids0 = system_ticks(), our_ticks(), children_cpu_ticks()
        self.tgt0 = cpu_ticks(self.target_pids())
        return self

    def __exit__(self, *exc):
        dt_s = max(1e-6, time.time() - self.t0)
        pct = lambda ticks: round(100.0 * ticks / CLK_TCK / dt_s, 1)  # noqa: E731
        self.target_pct = pct(cpu_ticks(self.target_pids()) - self.tgt0)
        self.target_seconds = round((cpu_ticks(self.target_pids()) - self.tgt0) / CLK_TCK, 2)
        sys1 = system_ticks()
        proc_ticks, irq_ticks, steal_ticks = (b - a for a, b in zip(self.sys0, sys1))
        ours = (our_ticks() - self.ours0) + (children_cpu_ticks() - self.kids0)
        # % of one core (the machine has nproc): processes that are not the benchmark's
        self.other_pct = max(0.0, pct(proc_ticks - ours))
        self.irq_pct = pct(irq_ticks)
        self.steal_pct = pct(steal_ticks)


class QuietGate:
    """Before a measurement, waits for the machine to be quiet: a short window in which
    processes that are not the benchmark's use under `threshold` % of a core. Waits at
    most `per_wait` s each time and `budget` s over the whole run, then goes ahead anyway
    (the run records how busy the machine was either way)."""

    def __init__(self, budget: float, per_wait: float = 30, threshold: float = 15,
                 window: float = 0.5):
        self.left, self.per_wait, self.threshold, self.window = budget, per_wait, threshold, window
        self.waited = 0.0

    def other_pct_now(self) -> float:
        with CpuWatch(lambda: []) as cpu:
            time.sleep(self.window)
        return cpu.other_pct

    def wait(self) -> float:
        if self.left <= 0:
            return 0.0
        t0 = time.time()
        limit = min(self.per_wait, self.left)
        while self.other_pct_now() >= self.threshold and time.time() - t0 < limit:
            time.sleep(1.0)
        waited = time.time() - t0 - self.window
        waited = max(0.0, waited)
        self.left -= waited
        self.waited += waited
        return round(waited, 1)


class Target:
    def __init__(self, name: str, port: int, proc: subprocess.Popen | None,
                 headers: dict | None = None, tree: bool = False):
        self.name = name
        self.port = port
        self.proc = proc
        self.headers = headers or {}
        self.tree = tree  # sum master + workers (nginx)
        self.skipped: str | None = None
        self.sink_base: str | None = None  # where /sink/... goes (direct: the sink itself)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid] + (children(self.proc.pid) if self.tree else [])

    def rss_kib(self) -> int:
        return sum(status_kib(p, "VmRSS") for p in self.pids())

    def hwm_kib(self) -> int:
        return sum(status_kib(p, "VmHWM") for p in self.pids())

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


class RssSampler:
    """Samples a target's RSS every `every` seconds in a thread; keeps the maximum."""

    def __init__(self, target: Target, every: float = 0.05):
        self.t = target
        self.every = every
        self.max = 0
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.max = max(self.max, self.t.rss_kib())
            self._stop.wait(self.every)

    def __enter__(self):
        self.max = self.t.rss_kib()
        self._th.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._th.join()
        self.max = max(self.max, self.t.rss_kib())


# --------------------------------------------------------------------------- configs

def nginx_common(d: str) -> str:
    os.makedirs(d, exist_ok=True)
    return f"""
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
"""


def nginx_temp_paths(d: str) -> str:
    return "\n".join(f"  {k}_temp_path {d}/{k};" for k in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def upstream_conf(d: str, port: int, www: str, stream_bytes: int) -> str:
    body_buf = stream_bytes + (1 << 20)
    return nginx_common(d) + f"""
http {{
  access_log off;
{nginx_temp_paths(d)}
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    # The benchmark's answer: refuses a request that carries no Authorization header, so a
    # proxy that forwarded without a token shows up as non-2xx in wrk's output.
    location = /small {{
      default_type application/json;
      if ($http_authorization = "") {{ return 401 '{{"error":"no_token"}}\\n'; }}
      return 200 '{{"ok":true,"service":"bench-upstream","items":[1,2,3]}}\\n';
    }}
    location = /auth {{ default_type text/plain; return 200 "$http_authorization"; }}
    location = /1mib {{ root {www}; }}
    location = /stream {{ root {www}; }}
    # Upload sink: nginx reads the whole body (request buffering, in memory) before it
    # proxies a body-less request to /_uploaded, which answers with the request length seen.
    location = /upload {{
      client_max_body_size 0;
      client_body_buffer_size {body_buf};
      proxy_pass http://127.0.0.1:{port}/_uploaded;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header Transfer-Encoding "";
      proxy_set_header X-Request-Length $request_length;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
    location = /_uploaded {{ default_type text/plain; return 200 "$http_x_request_length\\n"; }}
  }}
}}
"""


def nginx_proxy_conf(d: str, port: int, up_port: int, sink_port: int) -> str:
    return nginx_common(d) + f"""
http {{
  access_log off;
{nginx_temp_paths(d)}
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  upstream backend {{
    server 127.0.0.1:{up_port};
    keepalive 64;
    keepalive_requests 100000000;
  }}
  upstream sink {{
    server 127.0.0.1:{sink_port};
    keepalive 64;
    keepalive_requests 100000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    client_max_body_size 0;
    location /sink {{
      proxy_pass http://sink;
{nginx_proxy_directives()}
    }}
    location / {{
      proxy_pass http://backend;
{nginx_proxy_directives()}
    }}
  }}
}}
"""


def nginx_proxy_directives() -> str:
    return f"""\
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static";
      # streaming both ways, no temp files, 64k buffers: what an nginx user would set for
      # large bodies (the default 4k/8k buffers halve its download throughput here)
      proxy_request_buffering off;
      proxy_max_temp_file_size 0;
      proxy_buffer_size 64k;
      proxy_buffers 16 64k;
      proxy_busy_buffers_size 128k;
      proxy_read_timeout 300s;
      proxy_send_timeout 300s;
{os.environ.get("BENCH_NGINX_EXTRA", "")}"""


def bearer_proxy_conf(port: int, issuer_port: int, up_port: int, sink_port: int) -> str:
    return f"""# generated by bench/bench.py
[server]
listen = "127.0.0.1:{port}"

[providers.bench]
token_url = "http://127.0.0.1:{issuer_port}/bearer-proxy/oauth/token"
client_id = "bench-client"
client_secret = "bench-secret"

[[routes]]
upstream = "http://127.0.0.1:{up_port}"
provider = "bench"

[[routes]]
path_prefix = "/sink"
strip_prefix = false
upstream = "http://127.0.0.1:{sink_port}"
provider = "bench"
"""


def envoy_conf(port: int, admin_port: int, issuer_port: int, up_port: int,
               sink_port: int) -> str:
    def cluster(name: str, p: int) -> str:
        return f"""  - name: {name}
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {p} }}
"""
    return f"""# generated by bench/bench.py
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
  secrets:
  - name: bench-client-secret
    generic_secret:
      secret: {{ inline_string: "bench-secret" }}
  listeners:
  - name: main
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          stream_idle_timeout: 300s
          route_config:
            name: all
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/sink" }}
                route: {{ cluster: sink, timeout: 0s }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: upstream, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.credential_injector
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector
              overwrite: true
              credential:
                name: envoy.http.injected_credentials.oauth2
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2
                  token_endpoint:
                    cluster: issuer
                    timeout: 3s
                    uri: "http://127.0.0.1:{issuer_port}/envoy/oauth/token"
                  client_credentials:
                    client_id: bench-client
                    client_secret:
                      name: bench-client-secret
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{cluster("upstream", up_port)}{cluster("sink", sink_port)}{cluster("issuer", issuer_port)}"""


# --------------------------------------------------------------------------- wrk

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(s: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", s.strip())
    if not m:
        raise ValueError(f"bad latency {s!r}")
    return float(m.group(1)) * UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> dict:
    r: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        r[f"p{pct}_ms"] = to_ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    r["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return r


def case_key(conns: int, threads: int) -> str:
    return f"{conns}/t{threads}"


def split_case(key: str) -> tuple[str, str]:
    """("32", "2") from "32/t2"; results from before wrk threads varied are plain "32"."""
    c, _, t = key.partition("/t")
    return c, t or "2"


def round_ratios(a_runs: list, b_runs: list, field: str) -> list:
    """a/b for each round both ran (same round: the closest in time)."""
    b_by_round = {r.get("round"): r.get(field) for r in b_runs}
    out = []
    for r in a_runs:
        b = b_by_round.get(r.get("round"))
        if r.get(field) and b:
            out.append(round(r[field] / b, 3))
    return out


def run_wrk(t: Target, conns: int, duration: float, threads: int = 2, path: str = "/small") -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{conns}",
            f"-d{max(1, int(round(duration)))}s", "--latency"]
    for k, v in t.headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(t.base + path)
    with CpuWatch(t.pids) as cpu:
        p = run_bounded(argv, duration + 30)
    r = parse_wrk(p.stdout)
    r["exit"] = p.returncode
    # CPU of the proxy (for direct: of the upstream nginx), % of one core
    r["proxy_cpu_pct"] = cpu.target_pct if t.proc is not None else None
    # CPU used meanwhile by processes that are not part of the benchmark
    r["other_cpu_pct"] = cpu.other_pct
    r["irq_cpu_pct"] = cpu.irq_pct
    r["steal_cpu_pct"] = cpu.steal_pct
    if r["rps"] and r.get("proxy_cpu_pct"):
        # requests served per CPU-second the proxy (or upstream, for direct) used
        r["rps_per_cpu_core"] = round(r["rps"] / (r["proxy_cpu_pct"] / 100.0))
    if p.returncode != 0 or r["rps"] is None:
        r["error"] = (p.stderr or p.stdout).strip()[-500:]
    return r


# --------------------------------------------------------------------------- idle conns

async def _idle(port: int, n: int, hold: float, headers: dict, sample) -> dict:
    sem = asyncio.Semaphore(100)
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    req = (f"GET /small HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n"
           f"{extra}\r\n").encode()

    async def one():
        async with sem:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.write(req)
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if m:
                await asyncio.wait_for(r.readexactly(int(m.group(1))), 10)
            elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
                await asyncio.wait_for(r.readuntil(b"0\r\n\r\n"), 10)
            return r, w, status

    t0 = time.time()
    res = await asyncio.gather(*[one() for _ in range(n)], return_exceptions=True)
    opened = [x for x in res if not isinstance(x, BaseException)]
    errors = [repr(x) for x in res if isinstance(x, BaseException)]
    ok = sum(1 for _, _, s in opened if s == 200)
    open_s = time.time() - t0
    peak = last = 0
    end = time.time() + hold
    while time.time() < end:
        last = sample()
        peak = max(peak, last)
        await asyncio.sleep(0.1)
    # how many did the proxy keep open all along?
    still_open = 0
    for r, _, _ in opened:
        try:
            data = await asyncio.wait_for(r.read(1), 0.001)
            if data:
                still_open += 1  # unexpected bytes, but open
        except asyncio.TimeoutError:
            still_open += 1
        except Exception:  # noqa: BLE001
            pass
    for _, w, _ in opened:
        w.close()
    for _, w, _ in opened:
        try:
            await w.wait_closed()
        except Exception:  # noqa: BLE001
            pass
    return {"requested": n, "answered_200": ok, "still_open_after_hold": still_open,
            "open_seconds": round(open_s, 2), "peak_rss_kib_sampled": peak,
            "end_of_hold_rss_kib": last,
            "errors": errors[:3], "error_count": len(errors)}


def idle_rss(t: Target, n: int, hold: float) -> dict:
    before = t.rss_kib()
    r = asyncio.run(_idle(t.port, n, hold, t.headers, t.rss_kib))
    r["rss_before_kib"] = before
    # What 1,000 idle connections cost once the burst is over (the end of the hold), and
    # separately the highest RSS sampled during the burst and the hold, and VmHWM.
    r["rss_with_conns_kib"] = r.pop("end_of_hold_rss_kib")
    r["peak_rss_kib"] = r.pop("peak_rss_kib_sampled")
    r["hwm_kib"] = t.hwm_kib()
    r["growth_kib"] = r["rss_with_conns_kib"] - before
    time.sleep(0.5)
    r["rss_after_close_kib"] = t.rss_kib()
    return r


# --------------------------------------------------------------------------- streams

STREAMS = {
    "download": "GET /stream from the nginx upstream (sendfile)",
    "upload": "POST to the nginx upstream, which buffers the whole body before it answers",
    "upload_sink": "POST to bench/upload_sink.py, which discards the body as it arrives "
                   "(recv_into one reused 1 MiB buffer, a thread per connection)",
}


def curl_stream(t: Target, direction: str, size: int, src_file: str, tmp: str) -> dict:
    out_file = os.path.join(tmp, f"upload-answer-{t.name}.txt")
    timeout = 180
    if direction == "download":
        argv = ["curl", "-sS", "--max-time", str(timeout), "-o", "/dev/null",
                "-w", "%{http_code} %{size_download} %{time_total}", t.base + "/stream"]
    else:
        url = (t.sink_base or t.base) + "/sink/upload" if direction == "upload_sink" \
            else t.base + "/upload"
        argv = ["curl", "-sS", "--max-time", str(timeout), "-X", "POST", "-T", src_file,
                "-H", "Expect:", "-H", "Content-Type: application/octet-stream",
                "-o", out_file, "-w", "%{http_code} %{size_upload} %{time_total}", url]
    for k, v in t.headers.items():
        argv += ["-H", f"{k}: {v}"]
    base = t.rss_kib()
    with RssSampler(t) as s, CpuWatch(t.pids) as cpu:
        p = run_bounded(argv, timeout + 10)
    r: dict = {"exit": p.returncode, "other_cpu_pct": cpu.other_pct}
    try:
        code, nbytes, secs = p.stdout.split()
        r.update(status=int(code), bytes=int(nbytes), seconds=round(float(secs), 3))
        r["mib_per_s"] = round(int(nbytes) / float(secs) / (1 << 20), 1) if float(secs) else None
    except ValueError:
        r["error"] = (p.stderr or p.stdout).strip()[-300:]
        return r
    if direction.startswith("upload"):
        try:
            with open(out_file) as f:
                seen = int(f.read().strip() or 0)
            # nginx counts request line + headers + body; the sink counts body bytes
            r["upstream_request_length"] = seen
            r["upstream_got_whole_body"] = seen >= size
        except (OSError, ValueError):
            r["upstream_got_whole_body"] = False
    ok = r["status"] == 200 and r["bytes"] == size and r.get("upstream_got_whole_body", True)
    if not ok:
        r["error"] = f"status {r['status']}, {r['bytes']} of {size} bytes; {p.stderr.strip()[-200:]}"
    if t.name != "direct":
        r["rss_before_kib"] = base
        r["rss_peak_kib"] = s.max
        r["rss_growth_kib"] = s.max - base
        r["proxy_cpu_seconds"] = cpu.target_seconds
    return r


# --------------------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = status_kib_file("/proc/meminfo", "MemTotal")
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "mem_total_mib": mem // 1024 if mem else None}


def status_kib_file(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmd_version(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def envoy_version(path: str) -> str:
    if not path:
        return "n/a"
    m = re.search(r"/(\d+\.\d+\.\d+)/", cmd_version([path, "--version"]))
    return m.group(1) if m else "unknown"


def fmt_mib(kib):
    return f"{kib / 1024:.1f}" if kib is not None else "–"


def fmt_range(lo, hi, nd=2):
    return "–" if lo is None or hi is None else f"{fmt(lo, nd)}–{fmt(hi, nd)}"


def wrk_flags(threads) -> str:
    ts = threads if isinstance(threads, list) else [threads]
    return " and ".join(f"-t{t}" for t in ts)


def fmt(x, nd=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(res: dict) -> str:
    m = res["machine"]
    L = []
    L.append(f"## bearer-proxy benchmark ({res['mode']} run)\n")
    L.append(f"- date: {res['date']}")
    L.append(f"- machine: {m['nproc']} cores, {m['cpu_model']}, Linux {m['kernel']}, "
             f"{m['mem_total_mib']} MiB")
    v = res["versions"]
    nginx_v = re.sub(r"^.*nginx/", "", v["nginx"])
    wrk_v = re.sub(r"^wrk\s+(debian/)?", "", v["wrk"]).split("-")[0]
    L.append(f"- bearer-proxy {v['bearer_proxy'].split()[-1]} (git {v['git']}), "
             f"nginx {nginx_v}, Envoy {v['envoy']}, wrk {wrk_v}, curl "
             f"{v['curl'].split()[1] if len(v['curl'].split()) > 1 else '?'}")
    s = res["settings"]
    L.append(f"- load: wrk {wrk_flags(s['wrk_threads'])}, {s['rounds']} alternating round(s) "
             f"of {s['duration_s']} s per target, connection count and wrk thread count, "
             f"GET /small (keep-alive); medians over rounds, (min–max) over rounds")
    for name, info in res["targets"].items():
        if info.get("skipped"):
            L.append(f"- **{name} skipped**: {info['skipped']}")
    L.append("")
    L.append("### Throughput and latency (GET /small)\n")
    L.append("| conns | wrk | target | req/s (median) | req/s (min–max) | p50 ms | p99 ms | "
             "proxy CPU % | req/s per proxy core | errors |")
    L.append("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, per in res["load"].items():
        c, th = split_case(key)
        for name, r in per.items():
            per_core = (r["median_rps"] / (r["median_cpu_pct"] / 100.0)
                        if r["median_rps"] and r["median_cpu_pct"] else None)
            L.append(f"| {c} | -t{th} | {name} | {fmt(r['median_rps'], 0)} | "
                     f"{fmt_range(r.get('min_rps'), r.get('max_rps'), 0)} | "
                     f"{fmt(r['p50_ms'], 3)} | "
                     f"{fmt(r['p99_ms'], 3)} | {fmt(r['median_cpu_pct'], 0)} | "
                     f"{fmt(per_core, 0)} | {r['errors']} |")
    L.append("")
    L.append("Proxy CPU % is of one core (the machine has "
             f"{m['nproc']}); for direct it is the upstream nginx's. wrk, the upstream and the "
             "proxy share the cores, so req/s per proxy core shows each proxy's own cost.")
    L.append("")
    L.append("| conns | wrk | bearer-proxy/nginx req/s | same round (min–max) | "
             "bearer-proxy/envoy req/s | p99 bearer-proxy/nginx | same round (min–max) | "
             "p99 bearer-proxy/envoy |")
    L.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, r in res["ratios"].items():
        c, th = split_case(key)
        rr, pr = r.get("rps_vs_nginx_rounds") or [], r.get("p99_vs_nginx_rounds") or []
        L.append(f"| {c} | -t{th} | {fmt(r['rps_vs_nginx'], 3)} | "
                 f"{fmt_range(min(rr, default=None), max(rr, default=None), 3)} | "
                 f"{fmt(r['rps_vs_envoy'], 3)} | {fmt(r['p99_vs_nginx'], 3)} | "
                 f"{fmt_range(min(pr, default=None), max(pr, default=None), 3)} | "
                 f"{fmt(r['p99_vs_envoy'], 3)} |")
    L.append("")
    n = s["idle_conns"]
    L.append(f"### Memory with {n} idle keep-alive connections\n")
    L.append(f"RSS with conns: at the end of the {s.get('idle_hold_s', '?')} s hold; peak: the "
             "highest RSS sampled (every 0.1 s) while they were opened and held; VmHWM: the "
             "kernel's high-water mark.\n")
    L.append("| proxy | RSS before MiB | RSS with conns MiB | growth MiB | peak sampled MiB | "
             "peak (VmHWM) MiB | after close MiB | answered 200 | still open |")
    L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in res["idle_rss"].items():
        if "error" in r and "rss_before_kib" not in r:
            L.append(f"| {name} | error: {r['error']} | | | | | | | |")
            continue
        L.append(f"| {name} | {fmt_mib(r['rss_before_kib'])} | {fmt_mib(r['rss_with_conns_kib'])} | "
                 f"{fmt_mib(r['growth_kib'])} | {fmt_mib(r.get('peak_rss_kib'))} | "
                 f"{fmt_mib(r['hwm_kib'])} | "
                 f"{fmt_mib(r.get('rss_after_close_kib'))} | {r['answered_200']} | "
                 f"{r['still_open_after_hold']} |")
    L.append("")
    size_mib = s["stream_bytes"] / (1 << 20)
    L.append(f"### Streaming {size_mib:.0f} MiB (curl, one transfer at a time, median of "
             f"{s['stream_reps']} alternating reps)\n")
    for d, per in res["stream"].items():
        if d in STREAMS:
            L.append(f"- {d}: {STREAMS[d]}")
    L.append("")
    L.append("| direction | target | MiB/s | MiB/s (min–max) | % of direct | % of direct, "
             "same rep (min–max) | seconds | RSS growth MiB | proxy CPU s |")
    L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for d, per in res["stream"].items():
        for name, r in per.items():
            if r.get("error") and r.get("mib_per_s") is None:
                L.append(f"| {d} | {name} | error: {r['error']} | | | | | | |")
                continue
            pr = r.get("pct_of_direct_reps") or []
            L.append(f"| {d} | {name} | {fmt(r['mib_per_s'], 0)} | "
                     f"{fmt_range(r.get('min_mib_per_s'), r.get('max_mib_per_s'), 0)} | "
                     f"{fmt(r.get('pct_of_direct'), 1)} | "
                     f"{fmt_range(min(pr, default=None), max(pr, default=None), 1)} | "
                     f"{fmt(r['seconds'], 2)} | {fmt_mib(r.get('rss_growth_kib'))} | "
                     f"{fmt(r.get('proxy_cpu_seconds'), 2)} |")
    L.append("")
    L.append("### Token requests during the whole run\n")
    L.append("| proxy | token requests |")
    L.append("| --- | ---: |")
    for name, c in res["token_requests"].items():
        L.append(f"| {name} | {c if c is not None else '–'} |")
    L.append("")
    if res.get("issue_targets"):
        L.append("### Targets (informational, not enforced)\n")
        L.append("| target | met | measured |")
        L.append("| --- | --- | --- |")
        for t in res["issue_targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            L.append(f"| {t['what']} | {met} | {t['measured']} |")
        L.append("")
    if res.get("notes"):
        L.append("### Notes\n")
        for note in res["notes"]:
            L.append(f"- {note}")
        L.append("")
    return "\n".join(L)


def svg_chart(res: dict) -> str:
    conns = list(res["load"].keys())
    targets = [t for t in TARGET_ORDER if any(t in res["load"][c] for c in conns)]
    colors = ["#4c78a8", "#f58518", "#54a24b", "#b279a2"]
    vals = {(t, c): res["load"][c].get(t, {}).get("median_rps") for t in targets for c in conns}
    vmax = max([v for v in vals.values() if v] + [1])
    # nice axis maximum
    mag = 10 ** (len(str(int(vmax))) - 1)
    top = next(k * mag for k in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if k * mag >= vmax * 1.05)
    W, H, left, right, topm, bottom = 760, 420, 80, 20, 60, 70
    pw, ph = W - left - right, H - topm - bottom
    gw = pw / max(1, len(targets))
    bw = min(60, gw * 0.7 / max(1, len(conns)))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">'
           f'Median req/s, GET /small through each proxy (higher is better)</text>',
           f'<text x="{W / 2}" y="42" text-anchor="middle" fill="#555">'
           f'{res["machine"]["nproc"]} cores, {esc(res["machine"]["cpu_model"])}, {res["date"][:10]}, '
           f'wrk {wrk_flags(res["settings"]["wrk_threads"])}, {res["settings"]["rounds"]}×'
           f'{res["settings"]["duration_s"]} s</text>']
    for i in range(6):
        v = top * i / 5
        y = topm + ph - ph * v / top
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{int(v):,}</text>')
    for ti, t in enumerate(targets):
        gx = left + gw * ti + (gw - bw * len(conns)) / 2
        for ci, c in enumerate(conns):
            v = vals[(t, c)]
            x = gx + ci * bw
            if v:
                h = ph * v / top
                out.append(f'<rect x="{x:.1f}" y="{topm + ph - h:.1f}" width="{bw - 4:.1f}" '
                           f'height="{h:.1f}" fill="{colors[ci % len(colors)]}"/>')
                out.append(f'<text x="{x + (bw - 4) / 2:.1f}" y="{topm + ph - h - 4:.1f}" '
                           f'text-anchor="middle" font-size="11">{v / 1000:.1f}k</text>')
            else:
                out.append(f'<text x="{x + (bw - 4) / 2:.1f}" y="{topm + ph - 4:.1f}" '
                           f'text-anchor="middle" font-size="11" fill="#a00">n/a</text>')
        out.append(f'<text x="{left + gw * ti + gw / 2:.1f}" y="{topm + ph + 20}" '
                   f'text-anchor="middle" font-size="13">{esc(t)}</text>')
    out.append(f'<line x1="{left}" x2="{W - right}" y1="{topm + ph}" y2="{topm + ph}" stroke="#333"/>')
    lx = left
    for ci, c in enumerate(conns):
        out.append(f'<rect x="{lx}" y="{H - 28}" width="14" height="14" fill="{colors[ci % len(colors)]}"/>')
        cc, th = split_case(c)
        out.append(f'<text x="{lx + 20}" y="{H - 17}">{cc} conns, -t{th}</text>')
        lx += 150
    out.append("</svg>")
    return "\n".join(out) + "\n"


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def issue_targets(res: dict) -> list[dict]:
    """The performance targets (issue #12), checked against this run."""
    out = []
    load, ratios = res["load"], res["ratios"]
    for key in load:
        c, th = split_case(key)
        r = ratios[key]
        v = r["rps_vs_nginx"]
        out.append({"what": f"req/s ≥ nginx at {c} conns, wrk -t{th}",
                    "met": None if v is None else v >= 1.0, "measured": f"{fmt(v, 3)}×"})
        v = r["p99_vs_nginx"]
        out.append({"what": f"p99 ≤ nginx at {c} conns, wrk -t{th}",
                    "met": None if v is None else v <= 1.0, "measured": f"{fmt(v, 3)}×"})
    ir = res["idle_rss"].get("bearer-proxy", {})
    if "rss_with_conns_kib" in ir:
        out.append({"what": f"RSS ≤ 16 MiB with {res['settings']['idle_conns']} idle conns",
                    "met": ir["rss_with_conns_kib"] <= 16 * 1024,
                    "measured": f"{fmt_mib(ir['rss_with_conns_kib'])} MiB "
                                f"(peak sampled {fmt_mib(ir.get('peak_rss_kib'))} MiB, "
                                f"VmHWM {fmt_mib(ir.get('hwm_kib'))} MiB)"})
    for d, per in res["stream"].items():
        r = per.get("bearer-proxy", {})
        if r.get("pct_of_direct") is not None:
            out.append({"what": f"{d} ≥ 90 % of direct", "met": r["pct_of_direct"] >= 90,
                        "measured": f"{r['pct_of_direct']:.1f} %"})
        for other in ("nginx", "envoy"):
            v = ratio(r.get("mib_per_s"), per.get(other, {}).get("mib_per_s"))
            if v is not None:
                out.append({"what": f"{d} ≥ 1.5 × {other}", "met": v >= 1.5,
                            "measured": f"{fmt(v, 2)}×"})
        if r.get("rss_growth_kib") is not None:
            out.append({"what": f"{d} RSS growth < 16 MiB", "met": r["rss_growth_kib"] < 16 * 1024,
                        "measured": f"{fmt_mib(r['rss_growth_kib'])} MiB"})
    n = res["token_requests"].get("bearer-proxy")
    out.append({"what": "exactly one token request for the whole run",
                "met": None if n is None else n == 1, "measured": str(n)})
    return out


# --------------------------------------------------------------------------- main

def render(json_path: str, out: str) -> int:
    """Rewrites results.md and throughput.svg from a results.json."""
    with open(json_path) as f:
        res = json.load(f)
    os.makedirs(out, exist_ok=True)
    md = markdown(res)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "throughput.svg"), "w") as f:
        f.write(svg_chart(res))
    print(md)
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--render":
        return render(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(
        epilog="bench.py --render RESULTS.json OUTDIR rewrites the table and the chart")
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bin", required=True, help="bearer-proxy binary")
    ap.add_argument("--envoy", default="", help="envoy binary ('' = skip)")
    ap.add_argument("--envoy-skip-reason", default="")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--conns", default="32,256")
    ap.add_argument("--wrk-threads", default="1,2", help="wrk -t values, each a load case")
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--idle-hold", type=float, default=5)
    ap.add_argument("--stream-bytes", type=int, default=1 << 30)
    ap.add_argument("--stream-reps", type=int, default=3)
    ap.add_argument("--stream-warmup", type=int, default=1, help="1: one unrecorded transfer first")
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--quiet-budget", type=float, default=0,
                    help="seconds the load phase may spend, in all, waiting for other "
                         "processes to go quiet before a run (0: never wait)")
    ap.add_argument("--git", default="unknown")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < a.idle_conns + 200:
        log(f"warning: open-files limit {hard} is below {a.idle_conns + 200}")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    global PIDFILE
    PIDFILE = a.pidfile
    procs = Procs(a.pidfile)
    conns = [int(c) for c in a.conns.split(",")]
    threads = [int(t) for t in a.wrk_threads.split(",")]
    tmp = a.tmp
    notes: list[str] = []
    t_start = time.time()
    try:
        # ---- files
        www = os.path.join(tmp, "www")
        os.makedirs(www, exist_ok=True)
        with open(os.path.join(www, "1mib"), "wb") as f:
            f.write(os.urandom(1 << 20))
        stream_file = os.path.join(www, "stream")
        with open(stream_file, "wb") as f:  # sparse: no disk I/O, reads back as zeros
            f.truncate(a.stream_bytes)

        # ---- upstream nginx
        up_port = free_port()
        conf = os.path.join(tmp, "upstream.conf")
        with open(conf, "w") as f:
            f.write(upstream_conf(os.path.join(tmp, "upstream"), up_port, www, a.stream_bytes))
        up = procs.start("nginx-upstream", ["nginx", "-p", tmp, "-c", conf, "-e",
                                            os.path.join(tmp, "upstream", "error.log")],
                         os.path.join(tmp, "upstream.log"))
        wait_until(lambda: http_get(f"http://127.0.0.1:{up_port}/auth")[0] == 200, 15,
                   "nginx upstream", up)

        # ---- issuer
        pf = os.path.join(tmp, "issuer.port")
        token_log = os.path.join(tmp, "token-requests.jsonl")
        issuer = procs.start("issuer", [sys.executable, os.path.join(HERE, "token_endpoint.py"),
                                        "--port-file", pf, "--log-file", token_log],
                             os.path.join(tmp, "issuer.log"))
        wait_until(lambda: os.path.exists(pf), 15, "issuer", issuer)
        with open(pf) as f:
            iss_port = int(f.read())
        wait_until(lambda: http_get(f"http://127.0.0.1:{iss_port}/count")[0] == 200, 15,
                   "issuer", issuer)

        # ---- streaming upload sink
        sink_pf = os.path.join(tmp, "sink.port")
        sink = procs.start("upload-sink", [sys.executable, os.path.join(HERE, "upload_sink.py"),
                                           "--port-file", sink_pf],
                           os.path.join(tmp, "upload-sink.log"))
        wait_until(lambda: os.path.exists(sink_pf), 15, "upload sink", sink)
        with open(sink_pf) as f:
            sink_port = int(f.read())

        targets: dict[str, Target] = {}
        targets["direct"] = Target("direct", up_port, up, {"Authorization": "Bearer direct"},
                                   tree=True)
        targets["direct"].sink_base = f"http://127.0.0.1:{sink_port}"

        # ---- bearer-proxy
        bp_port = free_port()
        bp_conf = os.path.join(tmp, "bearer-proxy.toml")
        with open(bp_conf, "w") as f:
            f.write(bearer_proxy_conf(bp_port, iss_port, up_port, sink_port))
        bp = procs.start("bearer-proxy", [a.bin, "--log-level", "warn", "run", "-c", bp_conf],
                         os.path.join(tmp, "bearer-proxy.log"))
        targets["bearer-proxy"] = Target("bearer-proxy", bp_port, bp)

        # ---- nginx proxy
        ng_port = free_port()
        ng_conf = os.path.join(tmp, "nginx-proxy.conf")
        with open(ng_conf, "w") as f:
            f.write(nginx_proxy_conf(os.path.join(tmp, "nginx-proxy"), ng_port, up_port,
                                     sink_port))
        ng = procs.start("nginx-proxy", ["nginx", "-p", tmp, "-c", ng_conf, "-e",
                                         os.path.join(tmp, "nginx-proxy", "error.log")],
                         os.path.join(tmp, "nginx-proxy.log"))
        targets["nginx"] = Target("nginx", ng_port, ng, tree=True)

        # ---- envoy
        env_t = Target("envoy", 0, None)
        if not a.envoy:
            env_t.skipped = a.envoy_skip_reason or "no Envoy binary"
        else:
            ev_port, ev_admin = free_port(), free_port()
            ev_conf = os.path.join(tmp, "envoy.yaml")
            with open(ev_conf, "w") as f:
                f.write(envoy_conf(ev_port, ev_admin, iss_port, up_port, sink_port))
            chk = subprocess.run(["timeout", "60", a.envoy, "--mode", "validate", "-c", ev_conf,
                                  "--log-level", "error"], capture_output=True, text=True)
            if chk.returncode != 0:
                env_t.skipped = ("Envoy rejected the credential-injector config: "
                                 + (chk.stderr or chk.stdout).strip()[-400:])
            else:
                ev = procs.start("envoy", [a.envoy, "-c", ev_conf, "--concurrency", "2",
                                           "--log-level", "warn", "--disable-hot-restart"],
                                 os.path.join(tmp, "envoy.log"))
                env_t = Target("envoy", ev_port, ev)
        targets["envoy"] = env_t
        if env_t.skipped:
            log(f"envoy skipped: {env_t.skipped}")

        # ---- sanity: each target answers and the upstream sees a bearer token
        sanity = {}
        for name, t in targets.items():
            if t.skipped:
                continue
            try:
                def ready(t=t):
                    st, body = http_get(t.base + "/auth", t.headers)
                    return body.decode() if st == 200 and body.startswith(b"Bearer ") else None
                auth = wait_until(ready, 30, f"{name} readiness", t.proc)
                st, body = http_get(t.base + "/1mib", t.headers)
                sanity[name] = {"authorization_seen_by_upstream":
                                auth.rsplit("-", 1)[0] + "-…" if auth.startswith("Bearer bench-") else auth,
                                "1mib_ok": st == 200 and len(body) == 1 << 20}
                if not sanity[name]["1mib_ok"]:
                    notes.append(f"{name}: GET /1mib did not return the 1 MiB file (status {st}).")
                log(f"{name} ready on {t.base}: upstream saw {sanity[name]['authorization_seen_by_upstream']!r}")
            except RuntimeError as e:
                t.skipped = f"not ready: {e}"
                log(f"{name} skipped: {t.skipped}")
        active = [n for n in TARGET_ORDER if not targets[n].skipped]

        # ---- idle connections (fresh processes, before any load)
        idle = {}
        for name in PROXIES:
            t = targets[name]
            if t.skipped:
                idle[name] = {"error": t.skipped}
                continue
            log(f"idle: {a.idle_conns} keep-alive connections to {name}")
            try:
                idle[name] = idle_rss(t, a.idle_conns, a.idle_hold)
            except Exception as e:  # noqa: BLE001
                idle[name] = {"error": repr(e)}
            time.sleep(0.5)

        # ---- load: warm-up, then alternating rounds
        for name in active:
            run_wrk(targets[name], conns[0], a.warmup, threads=threads[0])
        # one case per connection count and wrk thread count, keyed "32/t1"
        cases = [(c, th) for th in threads for c in conns]
        runs: dict[str, dict[str, list]] = {case_key(c, th): {n: [] for n in active}
                                            for c, th in cases}
        gate = QuietGate(a.quiet_budget)
        for rnd in range(a.rounds):
            order = active[rnd % len(active):] + active[:rnd % len(active)]
            for c, th in cases:
                for name in order:
                    t = targets[name]
                    if not t.alive():
                        continue
                    waited = gate.wait()
                    r = run_wrk(t, c, a.duration, threads=th)
                    r["round"] = rnd + 1
                    r["waited_for_quiet_s"] = waited
                    runs[case_key(c, th)][name].append(r)
                    log(f"round {rnd + 1}/{a.rounds} c={c} t={th} {name}: {r.get('rps')} req/s, "
                        f"p99 {r.get('p99_ms')} ms, cpu {r.get('proxy_cpu_pct')}%, "
                        f"other {r.get('other_cpu_pct')}%"
                        + (f", non-2xx {r['non_2xx']}" if r.get("non_2xx") else "")
                        + (f", ERROR {r['error']}" if r.get("error") else ""))
        load = {}
        for key in runs:
            per = {}
            for name in active:
                rs = runs[key][name]
                per[name] = {
                    "median_rps": med([r["rps"] for r in rs]),
                    "min_rps": min([r["rps"] for r in rs if r.get("rps")], default=None),
                    "max_rps": max([r["rps"] for r in rs if r.get("rps")], default=None),
                    "p50_ms": med([r["p50_ms"] for r in rs]),
                    "p99_ms": med([r["p99_ms"] for r in rs]),
                    "median_cpu_pct": med([r["proxy_cpu_pct"] for r in rs]),
                    "median_other_cpu_pct": med([r["other_cpu_pct"] for r in rs]),
                    "max_other_cpu_pct": max([r["other_cpu_pct"] for r in rs], default=None),
                    "errors": sum((r.get("non_2xx") or 0) + (r.get("socket_errors") or 0)
                                  + (1 if r.get("error") else 0) for r in rs),
                    "runs": rs,
                }
            load[key] = per
        ratios = {}
        for c, per in load.items():
            bpr = per.get("bearer-proxy", {})
            ng_r = per.get("nginx", {})
            ev_r = per.get("envoy", {})
            ratios[c] = {
                # bearer-proxy/nginx within each round: the spread the medians hide
                "rps_vs_nginx_rounds": round_ratios(bpr.get("runs", []), ng_r.get("runs", []),
                                                    "rps"),
                "p99_vs_nginx_rounds": round_ratios(bpr.get("runs", []), ng_r.get("runs", []),
                                                    "p99_ms"),
                "rps_vs_nginx": ratio(bpr.get("median_rps"), ng_r.get("median_rps")),
                "rps_vs_envoy": ratio(bpr.get("median_rps"), ev_r.get("median_rps")),
                "p99_vs_nginx": ratio(bpr.get("p99_ms"), ng_r.get("p99_ms")),
                "p99_vs_envoy": ratio(bpr.get("p99_ms"), ev_r.get("p99_ms")),
            }

        # ---- streams
        stream: dict[str, dict] = {d: {} for d in STREAMS}
        if a.stream_bytes > 0:
            for d in STREAMS:
                if a.stream_warmup:
                    for name in active:  # not recorded
                        curl_stream(targets[name], d, a.stream_bytes, stream_file, tmp)
                all_reps: dict[str, list] = {name: [] for name in active}
                # alternating, like the load rounds: drift hits every target alike
                for i in range(a.stream_reps):
                    order = active[i % len(active):] + active[:i % len(active)]
                    for name in order:
                        gate.wait()
                        r = curl_stream(targets[name], d, a.stream_bytes, stream_file, tmp)
                        all_reps[name].append(r)
                        log(f"stream {d} {name} #{i + 1}: {r.get('mib_per_s')} MiB/s, "
                            f"RSS growth {fmt_mib(r.get('rss_growth_kib'))} MiB"
                            + (f", ERROR {r['error']}" if r.get("error") else ""))
                for name in active:
                    t = targets[name]
                    reps = all_reps[name]
                    good = [r for r in reps if not r.get("error")]
                    pick = good or reps
                    # the rep with the median throughput, plus the worst RSS growth over reps
                    pick = sorted(pick, key=lambda r: r.get("mib_per_s") or 0)[len(pick) // 2]
                    summary = dict(pick)
                    rates = [r["mib_per_s"] for r in good if r.get("mib_per_s")]
                    summary["min_mib_per_s"] = min(rates, default=None)
                    summary["max_mib_per_s"] = max(rates, default=None)
                    if t.name != "direct":
                        summary["rss_growth_kib"] = max(r.get("rss_growth_kib") or 0 for r in reps)
                    summary["reps"] = reps
                    stream[d][name] = summary
                direct = stream[d].get("direct", {}).get("mib_per_s")
                for name, r in stream[d].items():
                    r["pct_of_direct"] = (round(100.0 * r["mib_per_s"] / direct, 1)
                                          if direct and r.get("mib_per_s") else None)
                    # the same ratio rep by rep (rep i of every target ran back to back)
                    r["pct_of_direct_reps"] = [
                        round(100.0 * x["mib_per_s"] / y["mib_per_s"], 1)
                        for x, y in zip(r.get("reps", []),
                                        stream[d].get("direct", {}).get("reps", []))
                        if x.get("mib_per_s") and y.get("mib_per_s")]

        if gate.waited >= 1:
            notes.append(f"The benchmark waited {gate.waited:.0f} s in all for other "
                         f"processes on the machine to go quiet before its runs.")
        noisy = [(c, n, r["other_cpu_pct"]) for c in runs for n in active
                 for r in runs[c][n] if (r.get("other_cpu_pct") or 0) > 20]
        if noisy:
            worst = max(x[2] for x in noisy)
            notes.append(f"Other work on the machine used more than 20 % of a core during "
                         f"{len(noisy)} of {sum(len(runs[c][n]) for c in runs for n in active)} "
                         f"load runs (worst {worst:.0f} %); medians over alternating rounds "
                         f"damp this, but rerun on a quiet machine for final numbers.")
        else:
            notes.append("The machine was otherwise quiet during the load runs (other "
                         "processes used under 20 % of a core in every run).")

        # ---- tokens
        # from the issuer's request log file, which outlives the issuer process
        token_requests_log = []
        if os.path.exists(token_log):
            with open(token_log) as f:
                token_requests_log = [json.loads(line) for line in f if line.strip()]
        counts: dict[str, int] = {}
        for entry in token_requests_log:
            counts[entry["client"]] = counts.get(entry["client"], 0) + 1
        tokens = {"bearer-proxy": counts.get("bearer-proxy", 0) if not targets["bearer-proxy"].skipped else None,
                  "envoy": counts.get("envoy", 0) if not targets["envoy"].skipped else None,
                  "nginx": None}
        notes.append("nginx sends a fixed header and makes no token requests.")

        # ---- process health
        for name, p in procs.procs:
            if p.poll() is not None:
                how = (f"signal {-p.returncode}" if p.returncode < 0
                       else f"status {p.returncode}")
                notes.append(f"{name} (pid {p.pid}) exited during the run ({how}); "
                             f"numbers measured after that are missing or wrong.")
                log(f"warning: {name} exited during the run ({how})")

        versions = {
            "bearer_proxy": cmd_version([a.bin, "--version"]),
            "git": a.git,
            "nginx": cmd_version(["nginx", "-v"]),
            "envoy": envoy_version(a.envoy),
            "wrk": " ".join(cmd_version(["wrk", "-v"]).split()[:2]),
            "curl": cmd_version(["curl", "--version"]),
            "python": platform.python_version(),
        }
        notes.append("Every server (upstream nginx, the issuer, the proxies, wrk, curl) shares "
                     "the same cores: numbers compare the proxies with each other on this "
                     "machine, not absolute capacity.")
        notes.append("The upstream answers 401 to a request that arrives without an "
                     "Authorization header, so a proxy that forgot the token shows as errors.")
        notes.append("Stream payload is a sparse file (zeros); uploads use curl -T with "
                     "'Expect:' cleared. Two upload sinks: the nginx upstream reads the whole "
                     "body before answering (so the proxy's pace is hidden behind nginx's "
                     "buffering), bench/upload_sink.py discards it as it arrives (so a slow "
                     "proxy shows); both answer with the length they read, which is checked.")
        res = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "mode": a.mode,
            "machine": machine_info(),
            "versions": versions,
            "settings": {"rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup,
                         "conns": conns, "wrk_threads": threads, "idle_conns": a.idle_conns,
                         "idle_hold_s": a.idle_hold, "stream_bytes": a.stream_bytes,
                         "stream_reps": a.stream_reps, "quiet_budget_s": a.quiet_budget, "envoy_concurrency": 2,
                         "nginx_worker_processes": 2, "bearer_proxy_log_level": "warn"},
            "targets": {n: {"description": DESCRIPTIONS[n], "skipped": targets[n].skipped}
                        for n in TARGET_ORDER},
            "sanity": sanity,
            "load": load,
            "ratios": ratios,
            "idle_rss": idle,
            "stream": stream,
            "token_requests": tokens,
            "issuer_log": token_requests_log,
            "notes": notes,
            "elapsed_s": None,
        }
        res["issue_targets"] = issue_targets(res)
        res["elapsed_s"] = round(time.time() - t_start, 1)

        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
        md = markdown(res)
        with open(os.path.join(a.out, "results.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(a.out, "throughput.svg"), "w") as f:
            f.write(svg_chart(res))
        print(md)
        log(f"wrote {a.out}/results.json, results.md, throughput.svg "
            f"({res['elapsed_s']} s)")
        return 0
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
