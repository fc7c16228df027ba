#!/usr/bin/env python3
"""A fast discard sink for uploads (loopback only): what a plain application server that
streams a request body to disk or a parser looks like to a proxy.

One thread per connection, keep-alive; each request's body (Content-Length or chunked) is
read with recv_into into one reused 1 MiB buffer and thrown away, then the sink answers
200 with the number of body bytes it read. Unlike an nginx upstream that buffers the whole
body before it answers, this sink reads as fast as the kernel delivers, so a proxy that
forwards slowly shows up as a lower share of the direct rate.

The port it bound is written to --port-file (bind to port 0 to let the kernel choose).
"""

import argparse
import os
import socket
import threading

BUF = 1 << 20
MAX_HEAD = 64 * 1024


class Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray(BUF)
        self.view = memoryview(self.buf)
        self.pending = b""  # bytes read past the current request head or chunk line

    def read_until(self, sep: bytes, limit: int) -> bytes | None:
        data = self.pending
        while sep not in data:
            if len(data) > limit:
                return None
            n = self.sock.recv_into(self.buf, BUF)
            if n == 0:
                return None
            data += self.view[:n]
        head, _, self.pending = data.partition(sep)
        return head

    def discard(self, length: int) -> int:
        """Reads and drops `length` bytes; returns how many arrived before EOF."""
        got = min(length, len(self.pending))
        self.pending = self.pending[got:]
        while got < length:
            n = self.sock.recv_into(self.buf, min(BUF, length - got))
            if n == 0:
                break
            got += n
        return got

    def read_body(self, headers: dict[str, str]) -> int | None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            total = 0
            while True:
                line = self.read_until(b"\r\n", 1024)
                if line is None:
                    return None
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers up to the empty line
                        t = self.read_until(b"\r\n", MAX_HEAD)
                        if t is None:
                            return None
                        if t == b"":
                            return total
                if self.discard(size) < size or self.discard(2) < 2:
                    return None
                total += size
        length = int(headers.get("content-length", "0") or 0)
        got = self.discard(length)
        return got if got == length else None

    def serve(self) -> None:
        try:
            while True:
                head = self.read_until(b"\r\n\r\n", MAX_HEAD)
                if head is None:
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                if headers.get("expect", "").lower() == "100-continue":
                    self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                n = self.read_body(headers)
                if n is None:
                    return
                body = f"{n}\n".encode()
                self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                                  + body)
                if headers.get("connection", "").lower() == "close":
                    return
        except (OSError, ValueError):
            return
        finally:
            self.sock.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    a = ap.parse_args()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", a.port))
    srv.listen(1024)
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.replace(tmp, a.port_file)
    while True:
        sock, _ = srv.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Conn(sock).serve, daemon=True).start()


if __name__ == "__main__":
    main()
