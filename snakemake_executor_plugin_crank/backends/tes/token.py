"""A bearer token that a command prints, run again when the token runs out.

Institutional TES servers sit behind an OIDC gateway whose access tokens live minutes to an
hour. The user's command (an OIDC client-credentials request, a site's helper) prints the
token on stdout. It is run at start, again when the server answers 401 to a request made with
the current token, and shortly before the token's ``exp`` when the token is a JWT (read, not
verified: the server verifies it). Tokens and the command's output never appear in a message;
``secrets()`` lists them for the session's redaction.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
from typing import Callable, List, Optional

from ...errors import BackendUnavailable, CrankError

COMMAND_TIMEOUT_S = 60.0
# a JWT is replaced this long before its exp: a quarter of its life, at most a minute (the
# request made with it must still arrive in time, and clocks differ a little)
EARLY_MAX_S = 60.0
KEPT_SECRETS = 8  # earlier tokens redacted too: a message may quote a request made with one


class TokenCommandFailed(BackendUnavailable):
    """The command did not give a token; the message says why in one line, without it."""


def jwt_expiry(token: str) -> Optional[float]:
    """The ``exp`` of a JWT (seconds since the epoch), None for any other token."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp") if isinstance(payload, dict) else None
        return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
    except (ValueError, TypeError):
        return None


class TokenCommand:
    """The current token, from ``command`` (run by the shell); thread-safe: concurrent
    requests that find the token rejected or expiring run the command once."""

    def __init__(self, command: str, option: str = "the token command",
                 timeout: float = COMMAND_TIMEOUT_S, clock: Callable[[], float] = time.time,
                 report: Callable[[str], None] = lambda line: None):
        self.command = command
        self.option = option
        self.timeout = timeout
        self.clock = clock
        self.report = report
        self._lock = threading.Lock()
        self._token: Optional[str] = None
        self._renew_at: Optional[float] = None  # a JWT's exp, less the margin
        self._seen: List[str] = []
        self.runs = 0

    def secrets(self) -> List[str]:
        with self._lock:
            return list(self._seen)

    def current(self) -> str:
        """The token to send now: a new one when there is none yet or a JWT is about to
        expire. A JWT not yet expired is kept when the command fails (said once)."""
        with self._lock:
            if self._token is None:
                return self._run()
            if self._renew_at is not None and self.clock() >= self._renew_at:
                try:
                    return self._run()
                except TokenCommandFailed as e:
                    self._renew_at = None  # asked again only on a 401
                    self.report(f"{e}; the current token is used until the server refuses it")
            return self._token

    def rejected(self, token: str) -> str:
        """The server refused ``token`` (401): a new one, unless another request already
        replaced it."""
        with self._lock:
            if self._token is not None and self._token != token:
                return self._token
            return self._run()

    def _run(self) -> str:
        self.runs += 1
        try:
            done = subprocess.run(
                self.command, shell=True, capture_output=True, text=True, timeout=self.timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise TokenCommandFailed(
                f"{self.option} printed no token within {self.timeout:.0f} s") from None
        except OSError as e:
            raise TokenCommandFailed(f"{self.option} could not be run: {e.strerror}") from None
        token = done.stdout.strip()
        if done.returncode != 0:
            raise TokenCommandFailed(
                f"{self.option} failed (exit {done.returncode}){self._said(done.stderr, token)}")
        if not token or len(token.split()) != 1:
            raise TokenCommandFailed(
                f"{self.option} printed {'nothing' if not token else 'more than one word'} on "
                "stdout; it must print the token alone (e.g. pipe JSON through jq -r .access_token)")
        self._token = token
        self._seen = [token] + [s for s in self._seen if s != token][:KEPT_SECRETS - 1]
        expiry = jwt_expiry(token)
        now = self.clock()
        self._renew_at = None if expiry is None else expiry - min(EARLY_MAX_S, max(0.0, expiry - now) / 4)
        return token

    def _said(self, stderr: str, stdout: str) -> str:
        """The last line the command wrote on stderr, without anything it printed on stdout
        or any token (a failing command may still have printed one)."""
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        if not lines:
            return ""
        line = lines[-1][:200]
        for secret in [stdout.strip(), *self._seen]:
            if secret:
                line = line.replace(secret, "***")
        return f": {line}"


def first_token(source: TokenCommand) -> str:
    """The token at start; a failure is the user's to fix (CrankError)."""
    try:
        return source.current()
    except TokenCommandFailed as e:
        raise CrankError(str(e)) from None
