"""One HTTP session for a TES server: auth, retries with backoff and jitter, errors in one line.

Transport errors and 429/502/503/504 are retried for every method (and 500 for GET), with
exponential backoff and jitter (urllib3 ``Retry``, honouring ``Retry-After`` up to
RETRY_AFTER_MAX_S a time); what still fails becomes ``BackendUnavailable``. A 429, or a 503
with ``Retry-After``, also holds every request of the session until the time the server
asked for (``Throttled``, without sending): requests made once (status rounds) fail fast
meanwhile, and the caller's tolerance decides how long that may last. Creates neither set nor
obey that hold: each waits out its own answer (a gateway often limits creates alone, and its
Retry-After is rounded up to seconds, so one create's wait holding all of them would create
far below the rate the server takes), and at most a few are in flight at once. An answer
that is not JSON (a proxy's HTML page) is ``BackendUnavailable`` too. Any other 4xx is final and
explained (401/403: the credentials, 404: the URL). Credentials never appear in a message:
the URL is shown without its user-info. Messages that ask the user to check something name
it as the caller's ``Hints`` say (the settings layer knows its option names; this module does
not).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, InvalidHeader, ReadTimeoutError
from urllib3.util.retry import Retry

from ...errors import BackendUnavailable, CrankError

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
RETRIES = 5
# a Retry-After longer than this is not slept through inside one request
RETRY_AFTER_MAX_S = 10.0
CREATE = "create"  # the kind of request that posts a task


def redact(url: str) -> str:
    """``url`` without user name and password."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def retry_policy(total: int = RETRIES, backoff: float = 0.5) -> Retry:
    # 500 only where a repeat cannot do harm: GET (POST :cancel is idempotent too, but a
    # create is not; crank looks a create up by its tag before posting it again)
    return Retry(
        total=total,
        connect=total,
        read=total,
        status=total,
        backoff_factor=backoff,
        backoff_jitter=backoff,
        backoff_max=10.0,
        status_forcelist=(429, 502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD", "POST", "DELETE"}),
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
    )


class _GetRetry(Retry):
    """Also retry a 500 answer to an idempotent GET; sleep at most RETRY_AFTER_MAX_S for a
    Retry-After."""

    def is_retry(self, method, status_code, has_retry_after=False):
        if method == "GET" and status_code == 500:
            return self.total is None or self.total > 0
        return super().is_retry(method, status_code, has_retry_after)

    def get_retry_after(self, response):
        seconds = super().get_retry_after(response)
        return None if seconds is None else min(seconds, RETRY_AFTER_MAX_S)


@dataclass(frozen=True)
class Hints:
    """How the user sets what a message asks them to check."""

    url: str = "the TES URL"
    credentials: str = "the credentials"


class HttpError(CrankError):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Throttled(BackendUnavailable):
    """The server asked crank to wait (429, or 503 with Retry-After); nothing was done.
    ``retry_after``: seconds still to wait, when the server said."""

    def __init__(self, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.retry_after = retry_after


class Session:
    """Requests to one server; thread-safe enough for crank (one requests.Session whose
    connection pool is shared; a counter of requests by kind for tests and benchmarks)."""

    def __init__(
        self,
        base_url: str,
        user: Optional[str] = None,
        password: Optional[str] = None,
        token: Optional[str] = None,
        retries: int = RETRIES,
        backoff: float = 0.5,
        what: str = "the TES server",
        hints: Hints = Hints(),
        tokens=None,
    ):
        """``tokens``: a source of bearer tokens that change (``token.TokenCommand``): each
        request sends its current token, and a 401 to it is asked again once with a new one."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CrankError(
                f"{hints.url} {redact(base_url)!r} is not an http(s) URL, e.g. http://host:8000"
            )
        if parts.username and not user:  # user:password@host in the URL
            user, password = parts.username, parts.password or ""
        self.base = redact(base_url).rstrip("/")
        self.what = what
        self.session = requests.Session()
        self.session.trust_env = True
        policy = retry_policy(retries, backoff)
        policy = _GetRetry(**{k: getattr(policy, k) for k in (
            "total", "connect", "read", "status", "backoff_factor", "backoff_jitter",
            "backoff_max", "status_forcelist", "allowed_methods",
            "respect_retry_after_header", "raise_on_status", "raise_on_redirect")})
        adapter = HTTPAdapter(max_retries=policy, pool_connections=4, pool_maxsize=32)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        # for requests that must not be sent twice (a create): retried only when the
        # connection was never made; the caller decides after a lost answer
        self.once = requests.Session()
        once = HTTPAdapter(max_retries=Retry(
            total=retries, connect=retries, read=0, status=0, other=0,
            backoff_factor=backoff, backoff_jitter=backoff, backoff_max=10.0,
            allowed_methods=None, raise_on_status=False), pool_maxsize=8)
        self.once.mount("http://", once)
        self.once.mount("https://", once)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif user:
            self.session.auth = (user, password or "")
        self.auth_hint = hints.credentials
        self.once.headers.update(self.session.headers)
        self.once.auth = self.session.auth
        self.tokens = tokens
        self._secrets = [s for s in (token, password) if s]
        self._lock = threading.Lock()
        self.counts: dict = {}
        # (monotonic time before which no request but a create is sent, why)
        self._hold: tuple = (0.0, "")

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def _clean(self, text: str) -> str:
        for secret in self._secrets + (self.tokens.secrets() if self.tokens else []):
            text = text.replace(secret, "***")
        return text

    def request(
        self,
        method: str,
        path: str,
        kind: str,
        params: Optional[Mapping[str, Any]] = None,
        body: Any = None,
        timeout: float = READ_TIMEOUT,
        allow: tuple = (),
        retry_reads: bool = True,
    ) -> Optional[Any]:
        """JSON answer of ``method path``; None for a status in ``allow``."""
        until, why = self._hold
        left = until - time.monotonic()
        if left > 0 and kind != CREATE:
            raise Throttled(f"{why}; {left:.0f} s left, nothing sent", left)
        self.count(kind)
        url = self.base + path
        token = self.tokens.current() if self.tokens else None
        response = self._send(method, url, params, body, timeout, retry_reads, token)
        if response.status_code == 401 and token is not None:
            # an expired token: nothing was done, so the request is sent again, once
            response = self._send(method, url, params, body, timeout, retry_reads,
                                  self.tokens.rejected(token))
        status = response.status_code
        if status in allow:
            return None
        retry_after = _retry_after(response)
        if status == 429 or (status == 503 and retry_after is not None):
            wait = f" {retry_after:.0f} s" if retry_after is not None else ""
            why = f"{self.what} at {self.base} asked crank to wait{wait} (HTTP {status} on {method} {path})"
            if retry_after and kind != CREATE:
                self._hold = (time.monotonic() + retry_after, why)
            raise Throttled(why, retry_after)
        # 408 and 499 (a gateway whose call to the server was cut, as Funnel's while it
        # reconnects to itself) say nothing was done: like a 5xx, worth asking again
        if status >= 500 or status in (408, 499):
            raise BackendUnavailable(
                f"{self.what} at {self.base} failed: HTTP {status} on {method} {path}"
                f"{_detail(response, self._clean)}"
            )
        if status == 401:
            raise HttpError(f"401 from {self.what} ({self.base}): check {self.auth_hint}", status)
        if status == 403:
            raise HttpError(
                f"403 from {self.what} ({self.base}): these credentials may not {method} {path}; "
                f"check {self.auth_hint}", status)
        if status == 404:
            raise HttpError(
                f"404 from {self.what} for {method} {path}: is {self.base} the TES base URL "
                "(the part before /v1/tasks)?", status)
        if status >= 400:
            raise HttpError(
                f"{self.what} refused {method} {path}: HTTP {status}{_detail(response, self._clean)}",
                status)
        try:
            return response.json() if response.content else {}
        except ValueError:
            # e.g. the sign-in or error page of a proxy in front of the server
            kind = response.headers.get("Content-Type", "").split(";")[0].strip() or "no type"
            raise BackendUnavailable(
                f"{self.what} at {self.base} answered {method} {path} with something other than "
                f"JSON ({kind}: {_detail(response, self._clean)[2:82]!r}): not a TES server, or "
                "a proxy in between wants a sign-in"
            ) from None

    def _send(self, method: str, url: str, params, body, timeout: float, retry_reads: bool,
              token: Optional[str]) -> requests.Response:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            session = self.session if retry_reads else self.once
            return session.request(
                method, url, params=params,
                data=None if body is None else json.dumps(body),
                headers=headers or None,
                timeout=(CONNECT_TIMEOUT, timeout),
            )
        except requests.RequestException as e:
            raise BackendUnavailable(
                f"{self.what} at {self.base} did not answer ({self._clean(_reason(e, timeout))})"
                + (", after retries" if retry_reads else "")
            ) from None

    def close(self) -> None:
        self.session.close()
        self.once.close()


def _reason(e: Exception, read_timeout: float) -> str:
    # requests wraps a timeout that used up urllib3's retries in a plain ConnectionError
    cause = getattr(e.args[0], "reason", None) if e.args else None
    if isinstance(e, requests.exceptions.ConnectTimeout) or isinstance(cause, ConnectTimeoutError):
        return f"no connection within {CONNECT_TIMEOUT:.0f} s"
    if isinstance(e, requests.exceptions.ReadTimeout) or isinstance(cause, ReadTimeoutError):
        return f"no answer within {read_timeout:.0f} s"
    text = str(e)
    for marker in ("Caused by ", "Failed to establish a new connection: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip("()'\" ").splitlines()[0][:200] if text.strip() else type(e).__name__


def _retry_after(response: requests.Response):
    """Seconds the ``Retry-After`` header asks for (a number or an HTTP date), else None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, Retry().parse_retry_after(value))
    except InvalidHeader:
        return None


def _detail(response: requests.Response, clean) -> str:
    text = response.text.strip()
    if not text:
        return ""
    try:
        value = json.loads(text)
        text = value.get("message") or value.get("error") or text if isinstance(value, dict) else text
    except ValueError:
        pass
    return ": " + clean(str(text).splitlines()[0][:300])
