"""A token that runs out (issue 34, item 3): --crank-tes-token-command in front of a gateway
that refuses tokens older than a few seconds (the fault proxy before the real Funnel), and the
token logic itself."""

import base64
import hashlib
import hmac
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snakemake_executor_plugin_crank.backends.tes.token import TokenCommand, TokenCommandFailed, jwt_expiry
from snakemake_executor_plugin_crank.errors import BackendUnavailable

from conftest import live_tasks, proxy_to, tes_command, tes_run

LIFETIME_S = 3.0
# prints a token signed with the gateway's key, valid LIFETIME_S from now: a JWT, or an
# opaque token that crank cannot read; every token also goes to a file, to look for leaks
MINT = '''import base64, hashlib, hmac, json, sys, time
key, kind, lifetime, issued = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
now = time.time()
claims = json.dumps({"iat": now, "exp": now + lifetime}).encode()
body = ("eyJhbGciOiJIUzI1NiJ9." if kind == "jwt" else "opaque~") + \\
    base64.urlsafe_b64encode(claims).rstrip(b"=").decode()
token = body + ("." if kind == "jwt" else "~") + hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()
with open(issued, "a") as f:
    f.write(token + "\\n")
print(token)
'''


def gateway_check(key: str, lifetime: float):
    """The gateway's rule: a token signed with ``key`` and issued less than ``lifetime`` ago."""

    def authorize(header):
        if not header or not header.startswith("Bearer "):
            return False
        body, sep, signature = header[len("Bearer "):].rpartition("." if "." in header else "~")
        expected = hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()
        if not sep or not hmac.compare_digest(signature, expected):
            return False
        claims = body.split(sep)[-1]
        issued = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["iat"]
        return time.time() - issued < lifetime

    return authorize


def workflow(tmp_path: Path) -> Path:
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(
        'rule all:\n    input: "joined.txt"\n\n'
        'rule part:\n    output: "parts/{i}.txt"\n    shell: "sleep 4; echo {wildcards.i} > {output}"\n\n'
        'rule join:\n    input: expand("parts/{i}.txt", i=range(3))\n    output: "joined.txt"\n'
        '    shell: "sleep 2; cat {input} > {output}"\n'
    )
    return workdir


@pytest.mark.tes
@pytest.mark.parametrize("kind", ["opaque", "jwt"])
def test_an_expiring_token_is_refreshed_mid_run_with_no_failed_job(aws_env, tmp_path, kind):
    """Tokens live 3 s, the run about 10: an opaque token is replaced when the gateway answers
    401, a JWT before its exp; every job succeeds and no token is ever printed."""
    tes = aws_env
    key = "gateway-key"
    mint, issued = tmp_path / "mint.py", tmp_path / "issued.txt"
    mint.write_text(MINT)
    command = " ".join(shlex.quote(a) for a in (
        sys.executable, str(mint), key, kind, str(LIFETIME_S), str(issued)))
    workdir = workflow(tmp_path)
    with proxy_to(tes) as proxy:
        proxy.authorize = gateway_check(key, LIFETIME_S)
        done = tes_run(tes, workdir, "--crank-tes-url", proxy.url,
                       "--crank-tes-token-command", command)
        refused = proxy.actions("error401")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "joined.txt").read_text() == "0\n1\n2\n"
    assert "Error in rule" not in done.stderr and "Traceback" not in done.stderr
    tokens = issued.read_text().split()
    assert len(tokens) >= 3, tokens  # the first and at least two refreshes over ~10 s
    if kind == "opaque":
        assert refused, "the gateway never refused a token: nothing was refreshed on 401"
    logs = done.stdout + done.stderr + "".join(
        p.read_text(errors="replace") for p in (workdir / ".snakemake" / "log").glob("*"))
    assert not [t for t in tokens if t in logs]
    assert live_tasks(tes, workdir) == []


@pytest.mark.tes
def test_a_token_command_that_fails_is_one_line(aws_env, tmp_path):
    """Set in the environment (Snakemake prints its own command line, options included): the
    run stops before any job with one line, and nothing the command printed on stdout."""
    workdir = workflow(tmp_path)
    done = subprocess.run(
        tes_command(aws_env, workdir), cwd=workdir, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL, env={**aws_env.env(), "SNAKEMAKE_CRANK_TES_TOKEN_COMMAND":
                                       "printf 'half-%s' token; echo 'oidc: invalid_client' >&2; exit 3"})
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "--crank-tes-token-command" in line]
    assert lines == ["--crank-tes-token-command / SNAKEMAKE_CRANK_TES_TOKEN_COMMAND failed (exit 3): "
                     "oidc: invalid_client"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "half-token" not in done.stderr
    assert not (workdir / "parts").exists()


# ---------------------------------------------------------------- the token logic


def jwt(claims: dict) -> str:
    encode = lambda value: base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{encode({'alg': 'none'})}.{encode(claims)}.sig"


def counting(tmp_path: Path, *tokens: str) -> str:
    """A command that prints the given tokens one per run."""
    (tmp_path / "n").write_text("0")
    script = tmp_path / "next.py"
    script.write_text(
        "import pathlib, sys\n"
        f"n = pathlib.Path({str(tmp_path / 'n')!r}); i = int(n.read_text()); n.write_text(str(i + 1))\n"
        f"print({list(tokens)!r}[min(i, {len(tokens) - 1})])\n")
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def test_jwt_expiry_is_read_and_other_tokens_have_none():
    assert jwt_expiry(jwt({"exp": 1700000000})) == 1700000000.0
    for token in ("opaque", "a.b", "a.b.c", jwt({"sub": "x"}), jwt({"exp": "soon"}), jwt({"exp": True})):
        assert jwt_expiry(token) is None


def test_a_jwt_is_replaced_shortly_before_its_exp(tmp_path):
    now = [1000.0]
    first, second = jwt({"exp": 1000 + 3600}), jwt({"exp": 1000 + 7200})
    source = TokenCommand(counting(tmp_path, first, second), clock=lambda: now[0])
    assert source.current() == first
    now[0] = 1000 + 3600 - 61
    assert source.current() == first and source.runs == 1
    now[0] = 1000 + 3600 - 59  # within the last minute of its life
    assert source.current() == second and source.runs == 2


def test_a_short_jwt_is_replaced_in_the_last_quarter_of_its_life(tmp_path):
    now = [0.0]
    source = TokenCommand(counting(tmp_path, jwt({"exp": 4}), jwt({"exp": 8})), clock=lambda: now[0])
    source.current()
    now[0] = 2.9
    assert source.runs == 1 and source.current() and source.runs == 1
    now[0] = 3.1
    source.current()
    assert source.runs == 2


def test_a_rejected_token_is_replaced_once_for_concurrent_requests(tmp_path):
    source = TokenCommand(counting(tmp_path, "one", "two", "three"))
    assert source.current() == "one"
    assert source.rejected("one") == "two"
    assert source.rejected("one") == "two"  # another request already replaced it
    assert source.runs == 2 and source.secrets() == ["two", "one"]


def test_a_failed_refresh_before_exp_keeps_the_token_and_says_so_once(tmp_path):
    now, said = [0.0], []
    flag = tmp_path / "fail"
    token = jwt({"exp": 100})
    source = TokenCommand(f"test ! -e {shlex.quote(str(flag))} && echo {token} || exit 7",
                          option="--opt", clock=lambda: now[0], report=said.append)
    source.current()
    flag.touch()
    now[0] = 90
    assert source.current() == token and source.current() == token
    assert said == ["--opt failed (exit 7); the current token is used until the server refuses it"]
    with pytest.raises(TokenCommandFailed, match=r"^--opt failed \(exit 7\)$"):
        source.rejected(token)


@pytest.mark.parametrize("command,message", [
    ("true", "printed nothing on stdout; it must print the token alone"),
    ("echo two words", "printed more than one word on stdout"),
    ("echo secret-x; echo 'bad secret-x' >&2; exit 2", "failed (exit 2): bad ***"),
])
def test_a_command_without_a_token_is_one_line_without_it(command, message):
    with pytest.raises(TokenCommandFailed) as caught:
        TokenCommand(command, option="--opt").current()
    assert str(caught.value).startswith(f"--opt {message}")
    assert isinstance(caught.value, BackendUnavailable)  # mid-run: tolerated like an outage
    assert "secret-x" not in str(caught.value)


def test_a_command_that_hangs_is_one_line():
    with pytest.raises(TokenCommandFailed, match=r"^--opt printed no token within 1 s$"):
        TokenCommand("sleep 30", option="--opt", timeout=1).current()


@pytest.mark.parametrize("given,message", [
    ({"tes_token": "t", "tes_token_command": "echo t"},
     "give only one of --crank-tes-token, --crank-tes-token-command: they are different credentials"),
    ({"tes_token_command": "echo t", "tes_user": "u", "tes_password": "p"},
     "give only one of --crank-tes-token-command, --crank-tes-user/--crank-tes-password"),
    ({"tes_token_command": "  "}, "--crank-tes-token-command is empty; give a command that prints a token"),
])
def test_one_kind_of_credentials_is_checked_before_anything_runs(given, message):
    from snakemake_executor_plugin_crank.errors import CrankError
    from snakemake_executor_plugin_crank.settings import ExecutorSettings, check

    settings = ExecutorSettings(backend="tes", tes_url="http://127.0.0.1:1", storage_prefix="s3://b/p", **given)
    with pytest.raises(CrankError, match="^" + re.escape(message)):
        check(settings)
