"""The page's HTTP server: Python's own (one local user, a handful of routes), each route one Session call.

    GET  /                      the page (page.html beside this file)
    GET  /api/state             the Session's state as JSON
    GET  /api/view/N.png        panel N's picture: image, masks, prompts, ground-truth outlines (?truth=0: none)
    GET  /api/results/N.json    panel N's masks as a COCO results file (download)
    GET  /api/mask/N.png        panel N's masks as a PNG of object numbers (download)
    POST /api/open    {"index": i}
    POST /api/click   {"x": x, "y": y, "positive": true}
    POST /api/box     {"box": [x0, y0, x1, y1]}
    POST /api/undo | /api/new_object | /api/clear
    POST /api/upload?name=FILE  the image file's bytes

Model calls hold one lock: the page sends one action at a time, and a second tab waits rather than racing.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from samtune.app.session import Session, png
from samtune.errors import UserError

PAGE = Path(__file__).with_name("page.html")
MAX_UPLOAD = 64 * 1024 * 1024
PANEL_FILE = re.compile(r"^/api/(view|mask|results)/(\d+)\.(png|json)$")


def make_server(session: Session, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A server bound to (host, port) (port 0: any free one), not yet serving."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            pass  # one line per request would bury the address and the notes

        def _send(self, status: int, body: bytes, kind: str, download: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if download:
                self.send_header("Content-Disposition", f'attachment; filename="{download}"')
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value: object, status: int = 200) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
                return
            if url.path == "/api/state":
                with lock:
                    self._json(session.state())
                return
            match = PANEL_FILE.match(url.path)
            if not match or int(match[2]) >= len(session.panels):
                self._send(404, b"not found", "text/plain")
                return
            what, panel = match[1], int(match[2])
            with lock:
                try:
                    stem = Path(session.sources[session.index].name).stem if session.index is not None else "image"
                    name = f"{stem}.{session.panels[panel].name}"
                    if what == "view":
                        truth = parse_qs(url.query).get("truth", ["1"])[0] != "0"
                        self._send(200, png(session.view(panel, truth)), "image/png")
                    elif what == "mask":
                        self._send(200, png(session.label_mask(panel)), "image/png", f"{name}.masks.png")
                    else:
                        body = json.dumps(session.results(panel), indent=1).encode()
                        self._send(200, body, "application/json", f"{name}.results.json")
                except UserError as error:
                    self._json({"error": str(error)}, 400)

        def do_POST(self) -> None:  # noqa: N802 - the base class's name
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD:
                self._json({"error": f"the file is larger than {MAX_UPLOAD // 2**20} MiB"}, 413)
                return
            body = self.rfile.read(length)
            action = url.path.removeprefix("/api/")
            with lock:
                try:
                    if action == "upload":
                        session.upload(parse_qs(url.query).get("name", ["upload"])[0], body)
                    else:
                        _act(session, action, json.loads(body or b"{}"))
                except UserError as error:
                    self._json({"error": str(error)}, 400)
                    return
                except (KeyError, TypeError, ValueError) as error:  # a malformed request, not the user's doing
                    self._json({"error": f"bad request to {url.path}: {error!r}"}, 400)
                    return
                self._json(session.state())

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as error:
        raise UserError(f"cannot serve on {host}:{port}: {error.strerror or error} (choose another: --port)") from error


def _act(session: Session, action: str, data: dict) -> None:
    if action == "open":
        session.open(int(data["index"]))
    elif action == "click":
        session.click(float(data["x"]), float(data["y"]), bool(data.get("positive", True)))
    elif action == "box":
        session.box(*(float(v) for v in data["box"]))
    elif action == "undo":
        session.undo()
    elif action == "new_object":
        session.new_object()
    elif action == "clear":
        session.clear()
    else:
        raise KeyError(action)


def serve(session: Session, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve until Ctrl-C, after saying where."""
    server = make_server(session, host, port)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    names = " | ".join(panel.name for panel in session.panels)
    print(f"samtune app: {names} on {len(session.sources)} images at http://{shown}:{server.server_port}/", flush=True)
    for note in session.notes:
        print(f"  {note}", file=sys.stderr)
    print("  Ctrl-C stops it.", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
