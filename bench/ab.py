#!/usr/bin/env python3
"""A/B comparison of bearer-proxy builds on one kind of load, interleaved (loopback only).

    bench/ab.py --mode upload|download|small [--rounds 5] [--mib 512] [--conns 32] \
        [--threads 1] [--secs 5] [--direct] [--nginx] [--envoy PATH] NAME=BINARY[@LOGLEVEL] [NAME=BINARY ...]

Starts the benchmark's nginx upstream, token endpoint and upload sink once, one proxy per
binary (each on its own port, all idle but the one measured), then measures them in turn,
round after round, so load from other work on the machine falls on every build alike.
Besides the rates it prints what does not depend on that load: the proxy's CPU seconds
per GiB (transfers) or CPU microseconds per request (small), read from /proc/PID/stat.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def tree_ticks(t) -> int:
    """CPU ticks of a target's process, and of its workers for nginx."""
    return sum(ticks(p) for p in t.pids())


def children_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped: curl (through timeout)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["upload", "download", "small"], required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--direct", action="store_true", help="also measure without a proxy")
    ap.add_argument("--nginx", action="store_true", help="also measure the nginx proxy (bench config)")
    ap.add_argument("--envoy", default="", help="also measure this Envoy binary (bench config)")
    ap.add_argument("bins", nargs="+", help="NAME=BINARY or NAME=BINARY@LEVEL (default warn)")
    a = ap.parse_args()
    size = a.mib << 20
    procs = bench.Procs(os.devnull)
    tmp = tempfile.mkdtemp(prefix="bearer-proxy-ab.")
    os.chmod(tmp, 0o755)
    try:
        www = os.path.join(tmp, "www")
        os.makedirs(www)
        src = os.path.join(tmp, "src.bin")
        with open(src, "wb") as f:
            f.truncate(size)
        os.link(src, os.path.join(www, "stream"))
        up_port = bench.free_port()
        with open(os.path.join(tmp, "up.conf"), "w") as f:
            f.write(bench.upstream_conf(os.path.join(tmp, "up"), up_port, www, size))
        up = procs.start("upstream", ["nginx", "-c", os.path.join(tmp, "up.conf"),
                                      "-p", tmp], os.path.join(tmp, "up.log"))
        bench.wait_until(lambda: bench.http_get(f"http://127.0.0.1:{up_port}/auth")[0] == 200,
                         15, "nginx upstream", up)
        pf = os.path.join(tmp, "issuer.port")
        issuer = procs.start("issuer", [sys.executable, os.path.join(HERE, "token_endpoint.py"),
                                        "--port-file", pf], os.path.join(tmp, "issuer.log"))
        bench.wait_until(lambda: os.path.exists(pf) and os.path.getsize(pf) > 0, 15,
                         "issuer", issuer)
        iss_port = int(open(pf).read())
        spf = os.path.join(tmp, "sink.port")
        sink = procs.start("sink", [sys.executable, os.path.join(HERE, "upload_sink.py"),
                                    "--port-file", spf], os.path.join(tmp, "sink.log"))
        bench.wait_until(lambda: os.path.exists(spf) and os.path.getsize(spf) > 0, 15,
                         "sink", sink)
        sink_port = int(open(spf).read())
        targets = []
        if a.direct:
            t = bench.Target("direct", up_port, None, {"Authorization": "Bearer direct"})
            t.sink_base = f"http://127.0.0.1:{sink_port}"
            targets.append(t)
        for spec in a.bins:
            name, path = spec.split("=", 1)
            path, _, level = path.partition("@")  # NAME=BINARY@info: another log level
            port = bench.free_port()
            conf = os.path.join(tmp, f"{name}.toml")
            with open(conf, "w") as f:
                f.write(bench.bearer_proxy_conf(port, iss_port, up_port, sink_port))
            p = procs.start(name, [path, "--log-level", level or "warn", "run", "-c", conf],
                            os.path.join(tmp, f"{name}.log"))
            bench.wait_until(lambda: bench.http_get(f"http://127.0.0.1:{port}/small")[0] == 200,
                             30, name, p)
            targets.append(bench.Target(name, port, p))
        if a.nginx:
            port = bench.free_port()
            d = os.path.join(tmp, "nginx-proxy")
            conf = os.path.join(tmp, "nginx-proxy.conf")
            with open(conf, "w") as f:
                f.write(bench.nginx_proxy_conf(d, port, up_port, sink_port))
            p = procs.start("nginx", ["nginx", "-p", tmp, "-c", conf, "-e",
                                      os.path.join(d, "error.log")],
                            os.path.join(tmp, "nginx-proxy.log"))
            bench.wait_until(lambda: bench.http_get(f"http://127.0.0.1:{port}/small")[0] == 200,
                             15, "nginx proxy", p)
            targets.append(bench.Target("nginx", port, p, tree=True))
        if a.envoy:
            port, admin = bench.free_port(), bench.free_port()
            conf = os.path.join(tmp, "envoy.yaml")
            with open(conf, "w") as f:
                f.write(bench.envoy_conf(port, admin, iss_port, up_port, sink_port))
            p = procs.start("envoy", [a.envoy, "-c", conf, "--concurrency", "2",
                                      "--log-level", "warn", "--disable-hot-restart"],
                            os.path.join(tmp, "envoy.log"))
            bench.wait_until(lambda: bench.http_get(f"http://127.0.0.1:{port}/small")[0] == 200,
                             60, "envoy", p)
            targets.append(bench.Target("envoy", port, p))
        res: dict[str, list] = {t.name: [] for t in targets}
        for r in range(a.rounds):
            for t in targets:
                pid = t.proc.pid if t.proc else None
                c0 = tree_ticks(t) if pid else 0
                if a.mode == "small":
                    out = bench.run_wrk(t, a.conns, a.secs, a.threads)
                    c1 = tree_ticks(t) if pid else 0
                    n = (out.get("rps") or 0) * a.secs
                    us = (c1 - c0) / TICK / n * 1e6 if pid and n else None
                    row = (out.get("rps"), out.get("p99_ms"), us)
                    print(f"round {r} {t.name:>10}: {row[0]} req/s  p99 {row[1]} ms  "
                          f"cpu {us and round(us, 1)} us/req", flush=True)
                else:
                    direction = "upload_sink" if a.mode == "upload" else "download"
                    # the other end: the sink (uploads) or the nginx upstream (downloads)
                    peer = [sink.pid] if a.mode == "upload" else \
                        [up.pid] + bench.children(up.pid)
                    p0 = sum(ticks(x) for x in peer)
                    k0 = children_seconds()
                    out = bench.curl_stream(t, direction, size, src, tmp)
                    c1 = tree_ticks(t) if pid else 0
                    gib = size / (1 << 30)
                    cpu = (c1 - c0) / TICK / gib if pid else None
                    peer_cpu = (sum(ticks(x) for x in peer) - p0) / TICK / gib
                    curl_cpu = (children_seconds() - k0) / gib
                    row = (out.get("mib_per_s"), None, cpu, peer_cpu, curl_cpu)
                    print(f"round {r} {t.name:>10}: {row[0]} MiB/s  CPU s/GiB: "
                          f"proxy {cpu and round(cpu, 3)}, {'sink' if a.mode == 'upload' else 'nginx'} "
                          f"{peer_cpu:.3f}, curl {curl_cpu:.3f}  {out.get('error', '')}",
                          flush=True)
                res[t.name].append(row)
        print("median:")
        for name, rows in res.items():
            def m(i):
                xs = [x[i] for x in rows if x[i] is not None]
                return round(statistics.median(xs), 3) if xs else None
            extra = f"  peer cpu {m(3)}  curl cpu {m(4)}" if a.mode != "small" else ""
            print(f"  {name:>10}: rate {m(0)}  p99 {m(1)}  cpu {m(2)}{extra}")
    finally:
        procs.stop_all()
        subprocess.run(["rm", "-rf", tmp])
    return 0


if __name__ == "__main__":
    sys.exit(main())
