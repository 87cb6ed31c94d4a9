#!/usr/bin/env python3
"""A small HTTP/1.0 file server for the storage tests, with Range support and injected faults.

Usage: http_server.py ROOT [CERT KEY]  -- binds 127.0.0.1 on a free port, prints the port,
serves until killed; with a certificate and its key (PEM), over TLS (https://), each handshake
TLS_HANDSHAKE_DELAY seconds late if that variable is set.

Paths (NAME is a file under ROOT):
  /data/NAME           the file; honours "Range: bytes=a-b"; sends ETag and Last-Modified
  /norange/NAME        the file, ignoring Range (always 200 with the whole body)
  /fail500/N/NAME      500 for the first N requests to this path, then like /data/
  /drop/N/NAME         the first N requests send the headers and half the body, then close
  /dropmid/N/NAME      like /drop/, but counting only requests for ranges after byte 0 (the
                       open probe passes; the reads after it are cut)
  /fail500mid/N/NAME   500 for the first N requests for ranges after byte 0 (the probe passes)
  /always500/NAME      always 500
  /redirect/NAME       302 to /data/NAME
  /elsewhere/NAME      307 to http://localhost:PORT/data/NAME (another origin)
  /auth/NAME           401 unless "Authorization: Bearer let-me-in", then like /data/
  /shifted/NAME        ranges after byte 0 are answered one byte later than asked (a 206 whose
                       Content-Range and body start there): a server that lies about ranges
  /slow/NAME           like /data/, but ranges after byte 0 trickle: 16 KiB every 100 ms
  /stall/NAME          like /data/, but ranges after byte 0 send 16 KiB, then nothing more
  /silent/NAME         reads the request and never answers (the connection left open)
  /stallone/NAME       like /data/, but the first request for a range after byte 0 sends 16 KiB
                       (half of a shorter range), then nothing more (one stalled request among
                       flowing ones)
  /headtrickle/NAME    like /data/, but ranges after byte 0 get a status line, then one byte of
                       an unfinished header every 100 ms
  /early/NAME          like /data/, each response after a 100 Continue and a 103 Early Hints
  /manyheaders/NAME    like /data/, with 80 extra headers
  /novalid/NAME        no ETag, no Last-Modified; ranges after byte 0 come from NAME.alt (an
                       object that changed after it was opened)
  /weaketag/NAME       like /novalid/, with a weak ETag (W/"v") that never changes
  /sameetag/NAME       like /novalid/, with a strong ETag ("v") that never changes
  /__stats             JSON: requests seen per path (a query string, otherwise ignored, makes
                       a path count separately)
"""

import email.utils
import http.server
import json
import os
import re
import sys
import threading
import time

ROOT = sys.argv[1]
COUNTS = {}
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def _count(self):
        with LOCK:
            COUNTS[self.path] = COUNTS.get(self.path, 0) + 1
            return COUNTS[self.path]

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        if self.path == "/__stats":
            body = json.dumps(COUNTS).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        n = self._count()
        parts = self.path.lstrip("/").split("/")
        mode, rest = parts[0], parts[1:]
        limit = 0
        if mode in ("fail500", "fail500mid", "drop", "dropmid"):
            limit, rest = int(rest[0]), rest[1:]
        name = "/".join(rest).split("?")[0]  # a query string only makes a path count apart
        if mode == "silent":
            time.sleep(3600)  # a server that accepted the connection and went quiet
            return
        if mode == "elsewhere":
            # The same server under another host name: another origin to the client.
            self.send_response(307)
            port = self.server.server_address[1]
            self.send_header("Location", f"http://localhost:{port}/data/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", "/data/" + name)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if mode == "fail500mid":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if m and int(m.group(1)) > 0:
                with LOCK:
                    n = COUNTS[f"mid:{self.path}"] = COUNTS.get(f"mid:{self.path}", 0) + 1
            else:
                n = limit + 1
        if mode == "always500" or (mode in ("fail500", "fail500mid") and n <= limit):
            self.send_error(500, "injected failure")
            return
        if mode == "auth" and self.headers.get("Authorization") != "Bearer let-me-in":
            self.send_error(401, "no entry")
            return
        path = os.path.join(ROOT, name)
        changed = mode in ("novalid", "weaketag", "sameetag")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if changed and m and int(m.group(1)) > 0:
            path += ".alt"
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                size = st.st_size
                start, end = 0, size - 1
                status = 200
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if m and mode != "norange":
                    start = int(m.group(1))
                    start += 1 if mode == "shifted" and start > 0 else 0
                    end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                length = end - start + 1
                if mode == "early":
                    # Interim responses before the real one (RFC 9110 15.2).
                    self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self.wfile.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
                if mode == "headtrickle" and start > 0:
                    # A response head sent one byte every 100 ms, never finished.
                    self.wfile.write(b"HTTP/1.1 206 Partial Content\r\n")
                    for _ in range(36000):
                        self.wfile.write(b"X")
                        self.wfile.flush()
                        time.sleep(0.1)
                    return
                self.send_response(status)
                if mode == "manyheaders":
                    for i in range(80):  # S3 user metadata can bring dozens
                        self.send_header(f"X-Amz-Meta-K{i}", "v" * 20)
                self.send_header("Content-Length", str(length))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                if mode != "norange":
                    self.send_header("Accept-Ranges", "bytes")
                if mode == "weaketag":
                    self.send_header("ETag", 'W/"v"')
                elif mode == "sameetag":
                    self.send_header("ETag", '"v"')
                elif not changed:
                    self.send_header("ETag", f'"{st.st_mtime_ns:x}-{size:x}"')
                    self.send_header(
                        "Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True)
                    )
                self.end_headers()
                if head:
                    return
                f.seek(start)
                if mode == "dropmid" and start > 0:
                    with LOCK:
                        n = COUNTS[f"mid:{self.path}"] = COUNTS.get(f"mid:{self.path}", 0) + 1
                if (mode == "drop" or (mode == "dropmid" and start > 0)) and n <= limit:
                    self.wfile.write(f.read(length // 2))
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                if mode == "stallone" and start > 0:
                    with LOCK:
                        key = f"stallone:{self.path}"
                        COUNTS[key] = COUNTS.get(key, 0) + 1
                        stall = COUNTS[key] == 1
                else:
                    stall = mode == "stall" and start > 0
                if stall:
                    part = min(length, 16 << 10) if mode == "stall" else min(length // 2, 16 << 10)
                    self.wfile.write(f.read(part))
                    self.wfile.flush()
                    time.sleep(3600)  # a server gone silent, the connection left open
                    return
                slow = mode == "slow" and start > 0
                left = length
                while left > 0:
                    chunk = f.read(min(left, 16 << 10 if slow else 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
                    if slow:
                        self.wfile.flush()
                        time.sleep(0.1)
        except FileNotFoundError:
            self.send_error(404, "not found")
        except (BrokenPipeError, ConnectionResetError):
            pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
if len(sys.argv) > 3:
    import ssl

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[2], sys.argv[3])
    delay = float(os.environ.get("TLS_HANDSHAKE_DELAY", "0"))
    server.socket = tls.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=not delay
    )
    if delay:
        plain_finish = server.finish_request

        def finish_request(request, client_address):  # on the connection's own thread
            time.sleep(delay)
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError):
                return
            plain_finish(request, client_address)

        server.finish_request = finish_request
print(server.server_address[1], flush=True)
server.serve_forever()
