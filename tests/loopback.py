"""A small HTTP server on 127.0.0.1 for download tests: serves bytes by path with Range support,
records every request's headers, and can drop a connection part way on demand."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional


class Loopback:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.extra_headers: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        # path -> byte counts: each request of the path sends that many body bytes, then closes.
        self.drops: dict[str, list[int]] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                owner.requests.append((self.command, self.path, dict(self.headers.items())))
                data = owner.files.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                if match and self.headers.get("If-Range", etag) == etag:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                for key, value in owner.extra_headers.get(self.path, {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                drops = owner.drops.get(self.path)
                if drops:
                    self.wfile.write(payload[: drops.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, data: bytes, drops: Optional[list[int]] = None) -> str:
        self.files[path] = data
        if drops:
            self.drops[path] = list(drops)
        return self.url(path)

    def gets(self, path: str) -> list[dict[str, str]]:
        """The headers of every GET of ``path`` so far."""
        return [headers for method, p, headers in self.requests if method == "GET" and p == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
