#!/usr/bin/env python3
"""User-space instructions per small request, counted by valgrind's callgrind (loopback only).

    bench/instructions.py [--secs 4] [--conns 8] [--nginx] NAME=BINARY [NAME=BINARY ...]

Wall-clock rates and CPU seconds on a shared 2-core machine move with whatever else runs;
instruction counts do not. Each bearer-proxy binary (one worker, the benchmark's config)
and, with --nginx, the benchmark's nginx proxy (one process) runs under callgrind twice,
loaded by `wrk -t1 -cCONNS` for SECS and then 2*SECS seconds; the difference of the two
totals over the difference of the request counts is what one request costs, with start-up
and shutdown taken out. Kernel work (the system calls themselves) is not counted: per
request both proxies make the same 2 recvfrom and 2 writev. Needs valgrind and wrk.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402


def totals(out_prefix: str) -> int:
    """The instruction total callgrind wrote for the process (its `summary:` line)."""
    d = os.path.dirname(out_prefix)
    base = os.path.basename(out_prefix)
    total = 0
    for name in os.listdir(d):
        if name.startswith(base):
            with open(os.path.join(d, name)) as f:
                for line in f:
                    if line.startswith("summary:"):
                        total += int(line.split()[1])
    return total


def measure(argv: list[str], port: int, secs: int, conns: int, tmp: str, label: str) -> tuple[int, int]:
    """Runs `argv` under callgrind, loads it for `secs` seconds; (instructions, requests)."""
    out = os.path.join(tmp, f"cg.{label}.{secs}.out")
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"] + argv
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        bench.wait_until(lambda: bench.http_get(f"http://127.0.0.1:{port}/small", timeout=10)[0] == 200,
                         120, label, p)
        r = bench.run_bounded(["wrk", "-t1", f"-c{conns}", f"-d{secs}s",
                               f"http://127.0.0.1:{port}/small"], secs + 60)
        requests = 0
        for line in r.stdout.splitlines():
            if "requests in" in line:
                requests = int(line.split()[0])
    finally:
        # SIGINT: bearer-proxy shuts down; SIGQUIT: nginx stops at once. Either way
        # callgrind writes its totals when the process exits.
        os.killpg(p.pid, signal.SIGQUIT if "nginx" in argv[0] else signal.SIGINT)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
    return totals(out), requests


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--secs", type=int, default=4)
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--nginx", action="store_true", help="also count the nginx proxy")
    ap.add_argument("bins", nargs="*", help="NAME=BINARY")
    a = ap.parse_args()
    procs = bench.Procs(os.devnull)
    tmp = tempfile.mkdtemp(prefix="bearer-proxy-instr.")
    os.chmod(tmp, 0o755)
    try:
        www = os.path.join(tmp, "www")
        os.makedirs(www)
        up_port = bench.free_port()
        with open(os.path.join(tmp, "up.conf"), "w") as f:
            f.write(bench.upstream_conf(os.path.join(tmp, "up"), up_port, www, 1 << 20))
        up = procs.start("upstream", ["nginx", "-c", os.path.join(tmp, "up.conf"), "-p", tmp],
                         os.path.join(tmp, "up.log"))
        bench.wait_until(lambda: bench.http_get(f"http://127.0.0.1:{up_port}/auth")[0] == 200,
                         15, "nginx upstream", up)
        pf = os.path.join(tmp, "issuer.port")
        issuer = procs.start("issuer", [sys.executable, os.path.join(HERE, "token_endpoint.py"),
                                        "--port-file", pf], os.path.join(tmp, "issuer.log"))
        bench.wait_until(lambda: os.path.exists(pf) and os.path.getsize(pf) > 0, 15, "issuer", issuer)
        iss_port = int(open(pf).read())
        targets = []
        for spec in a.bins:
            name, path = spec.split("=", 1)
            port = bench.free_port()
            conf = os.path.join(tmp, f"{name}.toml")
            with open(conf, "w") as f:
                # One worker: every request runs on the one thread callgrind serialises anyway.
                f.write(bench.bearer_proxy_conf(port, iss_port, up_port, up_port)
                        .replace("[server]\n", "[server]\nworkers = 1\n", 1))
            targets.append((name, [path, "--log-level", "warn", "run", "-c", conf], port))
        if a.nginx:
            port = bench.free_port()
            d = os.path.join(tmp, "nginx-proxy")
            conf = os.path.join(tmp, "nginx-proxy.conf")
            with open(conf, "w") as f:
                f.write(bench.nginx_proxy_conf(d, port, up_port, up_port)
                        .replace("master_process on;", "master_process off;")
                        .replace("worker_processes 2;", "worker_processes 1;"))
            targets.append(("nginx", ["nginx", "-p", tmp, "-c", conf, "-e",
                                      os.path.join(d, "error.log")], port))
        for name, argv, port in targets:
            i1, r1 = measure(argv, port, a.secs, a.conns, tmp, name)
            i2, r2 = measure(argv, port, 2 * a.secs, a.conns, tmp, name)
            per = (i2 - i1) / (r2 - r1) if r2 > r1 else float("nan")
            print(f"{name:>14}: {per:,.0f} instructions per request "
                  f"({r1} and {r2} requests)", flush=True)
    finally:
        procs.stop_all()
        subprocess.run(["rm", "-rf", tmp])
    return 0


if __name__ == "__main__":
    sys.exit(main())
