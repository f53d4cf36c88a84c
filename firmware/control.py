"""The running unit's control socket: `usbmirror status` and friends talk to it.

A unix stream socket `<state-dir>/control.sock` (mode 0600). One request per connection: a JSON
object `{"cmd": NAME, ...}` terminated by a newline; the answer is one JSON object and a newline.
Answers always carry `"ok": true|false`; failures carry `"error"`.

What it does not do: authenticate beyond file permissions, or change configuration. The commands
a unit registers report and check (`status`, `verify`); the one that changes data is a remote
unit's `rollback`, which restores a source's image from before an incomplete resync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """The unit could not be reached or refused the request."""


def socket_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / SOCKET_NAME


class ControlServer:
    """Serves JSON commands on the state directory's control socket, one thread per request."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = socket_path(state_dir)
        self._handlers: dict[str, Handler] = {}
        self._server: socketserver.ThreadingUnixStreamServer | None = None
        self._thread: threading.Thread | None = None

    def register(self, cmd: str, handler: Handler) -> None:
        self._handlers[cmd] = handler

    def _dispatch(self, raw: bytes) -> dict[str, Any]:
        try:
            req = json.loads(raw)
        except ValueError as exc:
            return {"ok": False, "error": f"request is not JSON: {exc}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with a "cmd" string'}
        handler = self._handlers.get(req["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {req['cmd']!r}", "commands": sorted(self._handlers)}
        try:
            answer = handler(req)
        except Exception as exc:  # a failing handler must not take the unit down
            log.exception("control command failed cmd=%s", req["cmd"])
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, **answer}

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            # A socket left by a crashed unit; a live one would answer.
            try:
                request(self.path.parent, {"cmd": "ping"}, timeout=1.0)
            except ControlError:
                self.path.unlink()
            else:
                raise ControlError(f"another unit is already running with state dir {self.path.parent}")
        dispatch = self._dispatch

        class _Req(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                raw = self.rfile.readline(MAX_REQUEST)
                answer = dispatch(raw)
                self.wfile.write(json.dumps(answer, default=str).encode() + b"\n")

        old = os.umask(0o177)
        try:
            self._server = socketserver.ThreadingUnixStreamServer(str(self.path), _Req)
        finally:
            os.umask(old)
        self._server.daemon_threads = True
        self.register("ping", lambda req: {"pong": True})
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)
        self._thread.start()
        log.info("control socket listening path=%s", self.path)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def request(state_dir: str | os.PathLike[str], req: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the unit running with `state_dir` and return its answer."""
    path = socket_path(state_dir)
    if not path.exists():
        raise ControlError(f"no unit is running with state dir {state_dir} ({path} does not exist)")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise ControlError(f"cannot reach the unit at {path}: {exc.strerror or exc}") from exc
    try:
        answer = json.loads(buf)
    except ValueError as exc:
        raise ControlError(f"the unit at {path} sent a malformed answer") from exc
    if not isinstance(answer, dict):
        raise ControlError(f"the unit at {path} sent a malformed answer")
    return answer


def ask_unit(command: str, state_dir: str, req: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any] | None:
    """For a command line: send `req` to the unit's control socket and return its answer without
    "ok"; print one line (`usbmirror COMMAND: why`) to stderr and return None when that fails."""
    import sys

    try:
        ans = request(state_dir, req, timeout=timeout)
    except ControlError as exc:
        print(f"usbmirror {command}: {exc}", file=sys.stderr)
        return None
    if not ans.get("ok"):
        print(f"usbmirror {command}: {ans.get('error')}", file=sys.stderr)
        return None
    ans.pop("ok", None)
    return ans

