"""A fault-injecting HTTP proxy for the tests: on a Unix socket in front of a Docker engine,
or on a loopback TCP port in front of a TES server.

Every request is forwarded on a fresh connection to the engine with ``Connection: close``,
so the proxy needs no HTTP response parsing: it copies bytes until the engine closes.
Faults are chosen per request by a rule ``(method, path) -> action``, changeable at any
time:

- ``"pass"``: forward;
- ``"refuse"``: close the client's connection without forwarding (engine gone);
- ``"lose_answer"``: forward, let the engine act, then close without answering;
- ``"hang"``: accept and never answer (until ``hang_s`` or ``stop()``);
- ``"error500"``: answer 500 without forwarding;
- ``"error429"``, ``"error503"``: answer 429 / 503 with ``Retry-After: <retry_after_s>``
  without forwarding; ``"error401"``: answer 401; ``"html200"``: answer 200 with an HTML
  page (a proxy's login or error page);
- ``"drop_tag_filter"``: forward without the query's tag parameters (``tag_key``,
  ``tag_value``, ``tags[...]``), as a TES 1.0 server or a gateway that drops them;
  ``"drop_filters"``: without the ``state`` parameter too;
- ``"refuse_filters"``: a request whose query carries a tag or state parameter is answered
  400 (recorded as ``"error400"``), as a strict TES 1.0 server; others are forwarded.

``authorize(header)``, when set, is a gateway's check of each request's ``Authorization``
header (None when absent): a request it refuses is answered 401 (recorded as ``"error401"``).

Local only (a Unix socket in a test's temporary directory, or 127.0.0.1) and bounded: every
socket has a timeout, every thread is a daemon, ``stop()`` closes everything.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from typing import Callable, List, Optional, Tuple, Union
from urllib.parse import unquote

Rule = Callable[[str, str], str]
TIMEOUT_S = 30.0
# a Unix socket's path, or a TCP (host, port)
Address = Union[str, Tuple[str, int]]


def _socket(address: Address) -> socket.socket:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM)


def _read_head(conn: socket.socket) -> Optional[bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
        if len(data) > 1 << 20:
            return None
    return data


JSON = b"Content-Type: application/json\r\n"
CANNED = {
    "error500": (b"500 Internal Server Error", JSON, b'{"message":"injected server error"}'),
    "error429": (b"429 Too Many Requests", JSON + b"Retry-After: {retry_after}\r\n",
                 b'{"message":"slow down"}'),
    "error503": (b"503 Service Unavailable", JSON + b"Retry-After: {retry_after}\r\n",
                 b'{"message":"busy"}'),
    "error400": (b"400 Bad Request", JSON, b'{"message":"unknown query parameter"}'),
    "error401": (b"401 Unauthorized", JSON, b'{"message":"token expired"}'),
    "html200": (b"200 OK", b"Content-Type: text/html\r\n",
                b"<html><body><h1>Please sign in</h1></body></html>\n"),
}
TAG_PARAMETER = re.compile(r"^(tag_key|tag_value|tags\[.*\])$")
FILTER_PARAMETER = re.compile(r"^(tag_key|tag_value|tags\[.*\]|state)$")


def _without(head: bytes, parameter: "re.Pattern") -> bytes:
    """The request head with the query parameters whose name matches removed."""
    line, _, rest = head.partition(b"\r\n")
    method, target, version = line.decode("latin-1").split(" ", 2)
    path, _, query = target.partition("?")
    kept = [p for p in query.split("&")
            if p and not parameter.match(unquote(p.partition("=")[0]))]
    target = path + ("?" + "&".join(kept) if kept else "")
    return f"{method} {target} {version}".encode("latin-1") + b"\r\n" + rest


def _authorization(head: bytes) -> Optional[str]:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            return value.strip().decode("latin-1")
    return None


class FaultProxy:
    def __init__(self, listen: Address, upstream: Address, hang_s: float = 120.0,
                 retry_after_s: int = 1):
        """``listen``: a Unix socket path, or ("127.0.0.1", 0) for a free loopback port."""
        self.listen = listen
        self.upstream = upstream
        self.hang_s = hang_s
        self.retry_after_s = retry_after_s
        self.rule: Rule = lambda method, path: "pass"
        self.authorize: Optional[Callable[[Optional[str]], bool]] = None
        self.seen: List[Tuple[str, str, str]] = []  # (method, path, action)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._conns: List[socket.socket] = []
        self._server = _socket(listen)
        self._server.bind(listen)
        self._server.listen(64)
        self._server.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        if isinstance(self.listen, str):
            return f"unix://{self.listen}"
        host, port = self._server.getsockname()
        return f"http://{host}:{port}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_rule(self, rule: Rule) -> None:
        with self._lock:
            self.rule = rule

    def cut(self) -> None:
        """Close every open connection, as an engine that went away would (a long-lived
        one, such as the event stream, would otherwise keep working)."""
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass

    def actions(self, action: str) -> List[Tuple[str, str]]:
        with self._lock:
            return [(m, p) for m, p, a in self.seen if a == action]

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        with self._lock:
            for conn in self._conns:
                try:
                    conn.close()
                except OSError:
                    pass
        self._server.close()
        if isinstance(self.listen, str) and os.path.exists(self.listen):
            os.unlink(self.listen)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(TIMEOUT_S)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            head = _read_head(conn)
            if head is None:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, path = (request_line.split(" ") + ["", ""])[:2]
            path = re.sub(r"^/v[0-9.]+", "", path.split("?", 1)[0])
            with self._lock:
                action = self.rule(method, path)
                if action == "refuse_filters":
                    action = "error400" if _without(head, FILTER_PARAMETER) != head else "pass"
                if action == "pass" and self.authorize and not self.authorize(_authorization(head)):
                    action = "error401"
                self.seen.append((method, path, action))
            if action == "refuse":
                return
            if action == "hang":
                self._stopped.wait(self.hang_s)
                return
            if action in CANNED:
                status, headers, body = CANNED[action]
                headers = headers.replace(b"{retry_after}", str(self.retry_after_s).encode())
                conn.sendall(
                    b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (status, headers, len(body), body)
                )
                return
            if action == "drop_tag_filter":
                head = _without(head, TAG_PARAMETER)
            elif action == "drop_filters":
                head = _without(head, FILTER_PARAMETER)
            self._forward(conn, head, lose_answer=action == "lose_answer")
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _forward(self, conn: socket.socket, head: bytes, lose_answer: bool) -> None:
        header_end = head.index(b"\r\n\r\n")
        headers, rest = head[:header_end], head[header_end + 4 :]
        lines = [
            line for line in headers.split(b"\r\n")
            if not line.lower().startswith(b"connection:")
        ]
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            rest += chunk
        upstream = _socket(self.upstream)
        upstream.settimeout(TIMEOUT_S)
        with self._lock:
            self._conns.append(upstream)
        try:
            upstream.connect(self.upstream)
            upstream.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + rest)
            if lose_answer:
                upstream.recv(1)  # the engine has acted and begun to answer
                return
            while True:
                chunk = upstream.recv(65536)
                if not chunk:
                    return
                conn.sendall(chunk)
        finally:
            upstream.close()

