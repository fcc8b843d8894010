"""A static HTTP server on 127.0.0.1 that honours Range requests (no tests here).

zarr reads a shard's index with a *suffix* range (``Range: bytes=-N``) and its chunks with
closed ranges. Python's ``http.server`` ignores ``Range`` altogether (it answers 200 with the
whole file, which zarr would misread as the index); some object stores refuse suffix ranges
(Azure Blob Storage answers them with the whole blob or 416), which is why this handler is
written out rather than borrowed. It also counts requests, so tests can measure how many an
open takes.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    """GET/HEAD of files under the server's directory, with single byte ranges."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass  # quiet; requests are counted in _serve

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = Path(path).read_bytes()
        start, end = self._byte_range(len(data))
        if start is None:
            self.send_error(416)
            return
        partial = "Range" in self.headers
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if send_body:
            self.wfile.write(data[start:end])

    def _byte_range(self, size: int) -> tuple[int | None, int]:
        """``[start, end)`` of the request; (None, 0) when unsatisfiable."""
        header = self.headers.get("Range")
        if header is None:
            return 0, size
        m = _RANGE.match(header.strip())
        if m is None or m.groups() == ("", ""):
            return None, 0
        first, last = m.groups()
        if first == "":  # suffix range: the last N bytes
            return max(size - int(last), 0), size
        start = int(first)
        end = size if last == "" else min(int(last) + 1, size)
        return (start, end) if start < size else (None, 0)


@contextmanager
def serve(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``directory`` on a free port: ``(base URL, list of request paths)``."""

    def handler(*args: object, **kwargs: object) -> RangeHandler:
        return RangeHandler(*args, directory=str(directory), **kwargs)  # type: ignore[arg-type]

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
