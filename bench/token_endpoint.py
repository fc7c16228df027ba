#!/usr/bin/env python3
"""A tiny OAuth2 client-credentials token endpoint for the benchmark (loopback only).

POST <anything>/oauth/token  -> {"access_token": "...", "token_type": "Bearer", "expires_in": N}
GET  /count                  -> {"<prefix>": n, ...}  token requests counted per path prefix
                                (e.g. /bearer-proxy/oauth/token counts under "bearer-proxy")
GET  /log                    -> every token request: time, prefix, grant_type, client auth kind

The port it bound is written to --port-file (bind to port 0 to let the kernel choose).
With --log-file, every token request is also appended there as one JSON line, so the
counts survive this process (the benchmark reads them from the file).
"""

import argparse
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
COUNTS: dict[str, int] = {}
LOG: list[dict] = []
EXPIRES_IN = 86400
LOG_FILE: str | None = None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bench-issuer"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path == "/count":
            with LOCK:
                self._send(200, dict(COUNTS))
        elif self.path == "/log":
            with LOCK:
                self._send(200, {"requests": list(LOG)})
        else:
            self._send(404, {"error": "not_found"})

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        if not path.endswith("/oauth/token"):
            self._send(404, {"error": "not_found"})
            return
        prefix = path[: -len("/oauth/token")].strip("/") or "default"
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        try:
            if ctype == "application/json":
                params = json.loads(raw or b"{}")
            else:
                params = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
        except ValueError:
            self._send(400, {"error": "invalid_request"})
            return
        if params.get("grant_type") != "client_credentials":
            self._send(400, {"error": "unsupported_grant_type"})
            return
        basic = (self.headers.get("Authorization") or "").lower().startswith("basic ")
        if not basic and not params.get("client_id"):
            self._send(401, {"error": "invalid_client"})
            return
        with LOCK:
            COUNTS[prefix] = COUNTS.get(prefix, 0) + 1
            entry = {"t": time.time(), "client": prefix,
                     "client_auth": "basic" if basic else "body"}
            LOG.append(entry)
            if LOG_FILE:
                with open(LOG_FILE, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        self._send(200, {
            "access_token": f"bench-{prefix}-{secrets.token_hex(8)}",
            "token_type": "Bearer",
            "expires_in": EXPIRES_IN,
        })


def main() -> None:
    global EXPIRES_IN, LOG_FILE
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--expires-in", type=int, default=86400)
    ap.add_argument("--log-file")
    args = ap.parse_args()
    EXPIRES_IN = args.expires_in
    LOG_FILE = args.log_file
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    import os
    os.replace(args.port_file + ".tmp", args.port_file)
    srv.serve_forever()


if __name__ == "__main__":
    main()
