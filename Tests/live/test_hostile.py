"""Hostile input over the network (issue 7, point 2), against a real `clearhouse serve` over
TLS: the server never crashes, never answers 5xx to bad input, and writes nothing for a
refused request.

- schemathesis (independent of this code base) generates requests from docs/openapi.yaml,
  valid and invalid, for every route, for a bounded time;
- a Hypothesis fuzzer sends *correctly signed* events with hostile bodies (so they get past
  the signature to the parser and the ledger): invalid UTF-8, deep nesting, numbers beyond
  Int64, duplicate keys, wrong types, oversize strings; every 201 must be in the ledger once,
  nothing else;
- raw TLS requests: header injection (bare CR/LF, NUL, obs-fold), oversize and too many
  headers, conflicting lengths (request smuggling), path traversal and invalid UTF-8 in ids;
- slow clients: a slowloris head and a trickled body are cut off within the limits while other
  clients are served.
Bounded: every run has a count and a time limit, every socket a timeout.
"""
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from liveserver import ROOT, LiveServer, earn, slug

CONNECTION_IDLE_SECONDS = 15  # Limits.connectionIdleSecondsMax
REQUEST_READ_SECONDS = 10  # Limits.requestReadSecondsMax


@pytest.fixture(scope="module")
def server():
    s = LiveServer(rate_limits=False).start()
    s.accepted = set()  # webhook ids answered 201
    yield s
    assert s.alive(), "the server must survive hostile input"
    log = s.read_log()
    assert "Fatal error" not in log and "Program crashed" not in log
    assert s.stop() == 0
    out = s.ch("verify").stdout
    entries = int(re.search(r"ledgers, (\d+) entries", out).group(1))
    assert entries == len(s.accepted), f"the ledgers hold {entries} entries; {len(s.accepted)} postings were accepted"
    s.close()


def tls_context(server):
    ctx = ssl.create_default_context(cafile=os.path.join(server.certs, "ca.crt"))
    return ctx


def raw(server, data, timeout=10, chunks=None, pause=0.0):
    """Sends `data` (or `chunks` with `pause` seconds between them) over a fresh TLS
    connection; returns (status or None, raw response bytes, seconds until the server answered
    or closed)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        with tls_context(server).wrap_socket(sock, server_hostname="localhost") as tls:
            try:
                for c in (chunks or [data]):
                    tls.sendall(c)
                    if pause:
                        time.sleep(pause)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                pass
            response = b""
            try:
                while True:
                    part = tls.recv(65536)
                    if not part:
                        break
                    response += part
                    if b"\r\n\r\n" in response:
                        head, _, body = response.partition(b"\r\n\r\n")
                        m = re.search(rb"content-length: *(\d+)", head, re.I)
                        if m and len(body) >= int(m.group(1)):
                            break
            except (socket.timeout, ConnectionResetError, ssl.SSLError, OSError):
                pass
    m = re.match(rb"HTTP/1\.1 (\d{3})", response)
    return (int(m.group(1)) if m else None), response, time.monotonic() - started


def assert_not_5xx(status, response):
    assert status is None or status < 500, response[:500]
    if status is not None and status >= 400:
        assert b"application/problem+json" in response.lower() or status in (400, 431), response[:500]


def assert_still_serving(server):
    assert server.alive()
    assert server.http.get(f"{server.url}/healthz", timeout=10).status_code == 200


# MARK: schemathesis over the OpenAPI document

def test_schemathesis_finds_no_server_error(server):
    st_bin = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    seconds = os.environ.get("CLEARHOUSE_SCHEMATHESIS_SECONDS", "40")
    report = os.path.join(server.tmp, "schemathesis")
    # A real partner in the path, so requests reach authentication and parsing, not only 404.
    config = os.path.join(server.tmp, "schemathesis.toml")
    with open(config, "w") as f:
        f.write('[parameters]\npartner = "fuelco"\n')
    r = subprocess.run(
        [st_bin, "--config-file", config, "run", os.path.join(ROOT, "docs", "openapi.yaml"), "--url", server.url,
         "--tls-verify", os.path.join(server.certs, "ca.crt"),
         # One worker: with two threads, Hypothesis's ast.parse of filter lambdas can crash
         # CPython 3.11 ("AST constructor recursion depth mismatch"): a tool error, not ours.
         "--checks", "not_a_server_error", "--max-time", seconds, "--workers", "1",
         "--request-timeout", "10", "--phases", "examples,coverage,fuzzing",
         "--suppress-health-check", "all", "-H", "authorization: Bearer dev-token-fuelco",
         "--report-dir", report],
        capture_output=True, text=True, timeout=int(seconds) + 240,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "", "NO_COLOR": "1"})
    summary = r.stdout[-3000:]
    assert r.returncode == 0, summary + r.stderr[-2000:]
    m = re.search(r"(\d+) generated, (\d+) passed", r.stdout)
    assert m and int(m.group(1)) > 100 and m.group(1) == m.group(2), summary
    # Nothing it sent carried a valid signature, so nothing may have been written.
    assert_still_serving(server)
    assert server.balance("fuelco", "M1").status_code in (200, 404)


# MARK: signed, hostile bodies

def json_values(depth):
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=False), st.text(max_size=40),
        st.sampled_from(["", "M1", "FUEL-1", "x" * 200, "é", "\u0000", "\ud7ff", "../../etc/passwd"]))
    if depth == 0:
        return leaves
    return st.one_of(leaves, st.lists(json_values(depth - 1), max_size=4),
                     st.dictionaries(st.text(max_size=12), json_values(depth - 1), max_size=4))


event_types = st.sampled_from(["points.earned", "points.redeemed", "points.earn_reversed",
                               "points.redemption_reversed", "points.other", "", 7])


@st.composite
def hostile_bodies(draw):
    kind = draw(st.integers(0, 6))
    if kind == 0:  # a well-formed event with hostile values
        data = {"member": draw(st.one_of(st.just("M1"), st.text(max_size=70))),
                "points": draw(st.one_of(st.integers(-(2**70), 2**70), st.just(10), st.floats(allow_nan=False), st.text(max_size=5))),
                "reference": draw(st.one_of(st.text(max_size=140), st.just("R-fuzz")))}
        for extra in draw(st.lists(st.sampled_from(["original_reference", "occurred_at", "amount_minor", "x"]), max_size=3)):
            data[extra] = draw(json_values(1))
        return json.dumps({"type": draw(event_types), "data": data}).encode()
    if kind == 1:  # any JSON at all
        return json.dumps(draw(json_values(3))).encode()
    if kind == 2:  # deep nesting
        n = draw(st.integers(5, 5000))
        return (b"[" * n) + (b"]" * n)
    if kind == 3:  # duplicate keys
        return b'{"type":"points.earned","type":"points.redeemed","data":{"member":"M1","points":5,"points":6,"reference":"D1"}}'
    if kind == 4:  # invalid UTF-8 inside strings
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        return b'{"type":"points.earned","data":{"member":"M' + bad + b'","points":5,"reference":"U1"}}'
    if kind == 5:  # numbers beyond Int64 written out
        digits = draw(st.sampled_from(["9223372036854775808", "-9223372036854775809", "1e400", "1.0", "-0", "0x10", "00012"]))
        return ('{"type":"points.earned","data":{"member":"M1","points":' + digits + ',"reference":"N1"}}').encode()
    return draw(st.binary(max_size=300))  # bytes


def sign_bytes(secret, msg_id, body):
    """Standard Webhooks v1 over raw bytes (the package signs text, encoded as UTF-8, and
    these bodies need not be UTF-8)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    ts = str(int(time.time()))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": ts,
            "webhook-signature": "v1," + base64.b64encode(mac).decode()}


@settings(max_examples=int(os.environ.get("CLEARHOUSE_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=list(HealthCheck), derandomize=False)
@given(body=hostile_bodies(), n=st.integers(0, 10**12))
def test_signed_hostile_bodies_are_refused_cleanly_and_accepted_ones_land_once(server, body, n):
    msg_id = f"fz_{n}_{len(body)}"
    headers = sign_bytes(server.secrets["fuelco"], msg_id, body)
    r = server.http.post(f"{server.url}/v1/partners/fuelco/events", data=body, headers=headers, timeout=15)
    assert r.status_code < 500, (body[:200], r.status_code, r.text)
    if r.status_code == 201:
        server.accepted.add(msg_id)
    elif r.status_code != 200:
        assert r.headers["content-type"] == "application/problem+json", r.text
        assert slug(r) in ("malformed", "conflict", "insufficient-points", "unknown-original",
                           "reversal-exceeds-original", "member-mismatch", "too-large"), r.text


# MARK: raw requests

def request(method, path, headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1".encode(), b"host: localhost"]
    lines += [h if isinstance(h, bytes) else h.encode() for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@pytest.mark.parametrize("headers", [
    [b"webhook-id: a\rb", b"content-length: 0"],
    [b"webhook-id: a\nx-injected: 1", b"content-length: 0"],
    [b"webhook-id: a\x00b", b"content-length: 0"],
    [b"webhook-id: a", b" folded-continuation", b"content-length: 0"],
    [b"content-type: application/json", b"content-length: 5", b"transfer-encoding: chunked"],
    [b"content-length: -1"],
    [b"content-length: abc"],
    [b"content-length: 5", b"content-length: 6"],
    [b"x-big: " + b"a" * 40000],
    [f"x-h{i}: v".encode() for i in range(300)],
    [b"authorization: Bearer " + b"\xff" * 100],
    [b"authorization: Bearer " + b"t" * 5000],
    [b"bad header name: 1"],
])
def test_malformed_heads_get_4xx_or_a_closed_connection(server, headers):
    status, response, _ = raw(server, request("POST", "/v1/partners/fuelco/events", headers))
    assert_not_5xx(status, response)
    assert status != 201
    assert_still_serving(server)


@pytest.mark.parametrize("headers", [
    [b"x-big: " + b"a" * 40000],
    [f"x-h{i}: v".encode() for i in range(101)],
])
def test_a_head_the_parser_refuses_gets_a_problem_document(server, headers):
    """Over 32 KiB or 100 fields, the HTTP decoder refuses the head: a 400 problem document
    (`malformed`, naming the limits) like every refusal, not a bare 400, and the connection
    closes."""
    response, closed = until_closed(server, request("GET", "/healthz", headers))
    assert closed, response[:300]
    line, head = head_of(response)
    assert line == "HTTP/1.1 400 Bad Request" and head["content-type"] == "application/problem+json", response[:400]
    problem = json.loads(response.partition(b"\r\n\r\n")[2])
    assert problem["type"] == "urn:clearhouse:problem:malformed" and "at most 32 KiB in 100 fields" in problem["detail"]
    assert_still_serving(server)


@pytest.mark.parametrize("path", [
    "/v1/partners/..%2f..%2fetc%2fpasswd/events",
    "/v1/partners/../../coalition.sqlite/events",
    "/v1/partners/fuelco/members/..%2F..%2Fcoalition/balance",
    "/v1/partners/fuelco/members/%ff%fe/balance",
    "/v1/partners/fuelco/members/%00/balance",
    "/v1/partners/fuelco/statements/..%2f..%2fledgers%2ffuelco.sqlite.json",
    "/v1/partners/fuelco/statements/%2e%2e.csv",
    "/v1/partners/%ff/statements",
    "/v1/partners/fuelco/members/" + "a" * 5000 + "/balance",
    "/v1/partners/fuelco/statements/run-1.json?x=" + "%" * 100,
])
def test_traversal_and_invalid_ids_in_paths_are_refused(server, path):
    status, response, _ = raw(server, request("GET", path, [b"authorization: Bearer dev-token-fuelco"]))
    assert status is not None and 400 <= status < 500, response[:400]
    assert b"application/problem+json" in response.lower()
    assert b"SQLite" not in response and b"/tmp/" not in response, "no internals in an error"
    assert_still_serving(server)


def test_a_chunked_body_past_64_kib_is_cut_off(server):
    chunk = b"%x\r\n%s\r\n" % (16384, b"a" * 16384)
    head = request("POST", "/v1/partners/fuelco/events",
                   [b"content-type: application/json", b"transfer-encoding: chunked",
                    b"webhook-id: big1", b"webhook-timestamp: 1", b"webhook-signature: v1,x"])
    status, response, _ = raw(server, head + chunk * 8 + b"0\r\n\r\n")
    assert status in (401, 413), response[:400]
    assert_still_serving(server)


# MARK: how an HTTP/1 message ends its connection

def until_closed(server, data, timeout=10):
    """Sends `data` over a fresh TLS connection and reads until the server closes it; returns
    (response bytes, whether the server closed it before `timeout`, which is below the idle
    timeout of CONNECTION_IDLE_SECONDS that would close it anyway)."""
    assert timeout < CONNECTION_IDLE_SECONDS
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        with tls_context(server).wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(data)
            response = b""
            try:
                while part := tls.recv(65536):
                    response += part
            except (socket.timeout, TimeoutError):
                return response, False
            except (ConnectionResetError, ssl.SSLError):
                pass
    return response, True


def head_of(response):
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return head[0], {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}


def test_an_http_1_0_request_is_answered_in_http_1_0_and_its_connection_closed(server):
    response, closed = until_closed(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert closed, "an HTTP/1.0 request without keep-alive ends with its connection"
    status, headers = head_of(response)
    assert status == "HTTP/1.0 200 OK", response[:300]
    assert headers["connection"] == "close"
    assert response.endswith(b'{"status":"ok"}')
    # Keep-alive asked for in HTTP/1.0 is not given either: a response without a length
    # could not end otherwise.
    response, closed = until_closed(server, b"GET /healthz HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
    assert closed and head_of(response)[0] == "HTTP/1.0 200 OK", response[:300]


def test_connect_is_refused_and_the_connection_closed_at_once(server):
    # After a CONNECT head the HTTP parser reads the connection as a tunnel: the request
    # behind it cannot be read, so the answer says close and the connection closes at once
    # (it used to wait out the idle timeout). NIO's encoder sends no body in any answer to
    # CONNECT, so the 405 names what is served in `allow` alone.
    response, closed = until_closed(server, b"CONNECT localhost:443 HTTP/1.1\r\nhost: x\r\n\r\n" + request("GET", "/healthz"), timeout=5)
    assert closed, "the connection closes after the refusal"
    status, headers = head_of(response)
    assert status == "HTTP/1.1 405 Method Not Allowed", response[:300]
    assert headers["connection"] == "close" and headers["allow"] == "GET, HEAD, POST", response[:300]
    assert response.count(b"HTTP/1.1") == 1, "nothing behind it is answered"
    assert_still_serving(server)


def test_an_http_1_1_request_without_exactly_one_host_is_refused(server):
    for heads in (b"GET /healthz HTTP/1.1\r\n\r\n", b"GET /healthz HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n"):
        response, closed = until_closed(server, heads + request("GET", "/healthz"), timeout=5)
        assert closed, heads
        status, headers = head_of(response)
        assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close", response[:300]
        body = response.partition(b"\r\n\r\n")[2]
        assert len(body) == int(headers["content-length"]), response[:600]
        problem = json.loads(body)
        assert problem["type"] == "urn:clearhouse:problem:malformed" and "host" in problem["detail"], problem
        assert len(re.findall(rb"HTTP/1\.1 \d{3} ", response)) == 1, "nothing behind it is answered"
    # HTTP/1.0 needs none.
    response, _ = until_closed(server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert head_of(response)[0] == "HTTP/1.0 200 OK", response[:300]


def test_connection_close_in_any_letter_case_closes_after_the_response(server):
    for spelling in (b"close", b"Close", b"CLOSE", b"keep-alive, Close"):
        response, closed = until_closed(server, request("GET", "/healthz", [b"connection: " + spelling]))
        assert closed, spelling
        status, headers = head_of(response)
        assert status == "HTTP/1.1 200 OK" and headers["connection"] == "close", response[:300]
    # Without it, two pipelined requests get two answers on the one connection.
    two = request("GET", "/healthz") + request("GET", "/healthz", [b"connection: close"])
    response, closed = until_closed(server, two)
    assert closed and response.count(b"HTTP/1.1 200 OK") == 2, response[:600]
    assert response.lower().count(b"connection: close") == 1, "only the second answer closes"


def test_a_refusal_before_100_continue_closes_the_connection(server):
    """The client waits for `100 Continue` before its body; refused before that (no such
    partner, not JSON), it may never send the body, so the server must not read its next
    request as one (RFC 9110 10.1.1): it says `connection: close` and closes."""
    for method, path, ctype, status in (("POST", "/v1/partners/nope/events", "application/json", 404),
                                        ("POST", "/v1/partners/fuelco/events", "text/plain", 415),
                                        ("PUT", "/v1/partners/fuelco/events", "application/json", 405),
                                        ("POST", "/v1/nowhere", "application/json", 404)):
        head = request(method, path, [f"content-type: {ctype}".encode(), b"content-length: 40", b"expect: 100-continue"])
        response, closed = until_closed(server, head)
        assert closed, response[:300]
        line, headers = head_of(response)
        assert line.startswith(f"HTTP/1.1 {status} ") and headers["connection"] == "close", response[:400]
        assert b" 100 Continue" not in response


def signed_post(server, msg_id, body, extra=()):
    headers = sign_bytes(server.secrets["fuelco"], msg_id, body)
    lines = [f"{k}: {v}".encode() for k, v in headers.items()] + [b"content-length: %d" % len(body), *extra]
    return request("POST", "/v1/partners/fuelco/events", lines, body)


def test_a_request_pipelined_behind_an_answer_that_closes_is_never_decided(server):
    """RFC 9112 9.6: after an answer saying `close` the server processes no further request.
    A POST refused before its body (here: not JSON, `100-continue` awaited) is answered with
    `close`; a signed earn the client pipelined behind it, in the same write, must be neither
    answered nor posted, so that the client's retry is a new posting (201), not a replay."""
    refused = request("POST", "/v1/partners/fuelco/events",
                      [b"content-type: text/plain", b"content-length: 40", b"expect: 100-continue"], b"x" * 40)
    behind = signed_post(server, "pipe-behind-close", earn("PIPE1", 7, "pipe-ref-1").encode())
    response, closed = until_closed(server, refused + behind)
    assert closed, response[:400]
    line, headers = head_of(response)
    assert line.startswith("HTTP/1.1 415 ") and headers["connection"] == "close", response[:400]
    assert response.count(b"HTTP/1.1 ") == 1, f"one answer only: {response[:800]!r}"
    r = server.post("fuelco", earn("PIPE1", 7, "pipe-ref-1"), msg_id="pipe-behind-close")
    assert r.status_code == 201, ("the pipelined earn must not have been posted", r.status_code, r.text)
    server.accepted.add("pipe-behind-close")


def test_pipelined_postings_are_each_decided_and_answered_in_order(server):
    """Keep-alive pipelining: three signed earns in one write, the last saying `close`, get
    three answers in order (each decided only once the one before it is answered)."""
    ids = [f"pipe-keep-{k}" for k in range(3)]
    data = b"".join(signed_post(server, m, earn("PIPE2", 10, f"pipe-keep-ref-{k}").encode(),
                                [b"connection: close"] if k == 2 else [])
                    for k, m in enumerate(ids))
    response, closed = until_closed(server, data)
    assert closed, response[:600]
    answers = [a for a in response.split(b"HTTP/1.1 ") if a]
    assert len(answers) == 3 and all(a.startswith(b"201 ") for a in answers), response[:1500]
    balances = [json.loads(a.partition(b"\r\n\r\n")[2])["member_balance"] for a in answers]
    assert balances == [10, 20, 30], response[:1500]
    server.accepted.update(ids)


def test_a_request_pipelined_when_the_server_stops_is_never_decided():
    """SIGTERM while a posting's body is still arriving: the server finishes that posting
    (its answer says `close`) and stops; an earn pipelined behind it in the same write must be
    neither decided nor answered, so that its retry on the restarted server is new (201)."""
    s = LiveServer(rate_limits=False).start()
    try:
        first = signed_post(s, "stop-1", earn("STOP1", 5, "stop-ref-1").encode())
        behind = signed_post(s, "stop-2", earn("STOP1", 7, "stop-ref-2").encode())
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            with tls_context(s).wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(first[:-10])
                time.sleep(0.5)  # the first posting is being read
                s.proc.terminate()
                time.sleep(0.5)  # the server is stopping, waiting for that posting
                tls.sendall(first[-10:] + behind)
                response = b""
                try:
                    while part := tls.recv(65536):
                        response += part
                except (socket.timeout, ConnectionResetError, ssl.SSLError):
                    pass
        assert s.proc.wait(timeout=40) == 0
        s.proc = None
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", response)
        # The first, read since before the stop, is posted. The one behind it is refused with
        # 503 while the server drains (still listening), or dropped unread once it closes its
        # connections: never decided either way.
        assert statuses in ([b"201", b"503"], [b"201"]), response[:800]
        if len(statuses) == 2:
            second = response[response.index(b"HTTP/1.1 503"):]
            assert b"retry-after" in second.lower() and b"urn:clearhouse:problem:unavailable" in second, second[:400]
        s.start()
        r = s.post("fuelco", earn("STOP1", 7, "stop-ref-2"), msg_id="stop-2")
        assert r.status_code == 201 and r.json()["member_balance"] == 12, (r.status_code, r.text)
    finally:
        s.close()


def test_on_sigterm_readiness_turns_503_and_new_postings_get_503_with_retry_after():
    """While the server drains after SIGTERM (still listening for
    Limits.shutdownDrainMilliseconds), /readyz answers 503 and a new posting gets 503
    `unavailable` with `retry-after` and its connection closed; nothing of it is written, and
    the server exits 0."""
    s = LiveServer(rate_limits=False).start()
    try:
        assert s.http.get(f"{s.url}/readyz", timeout=10).status_code == 200
        stopped = time.monotonic()
        s.proc.terminate()
        # The window is one second: readiness must be seen early enough to post within it.
        deadline = stopped + 0.5
        ready = 200
        while ready != 503 and time.monotonic() < deadline:
            try:
                ready = s.http.get(f"{s.url}/readyz", timeout=2).status_code
            except Exception:
                break
        if ready != 503:
            pytest.skip("the drain window passed before readiness was read (a very slow machine)")
        try:
            r = s.post("fuelco", earn("DRAIN1", 5, "drain-ref-1"), msg_id="drain-1", timeout=5)
        except requests.exceptions.ConnectionError:
            if time.monotonic() - stopped < 1.0:
                raise
            pytest.skip("the drain window passed before the posting arrived (a very slow machine)")
        assert r.status_code == 503 and r.headers.get("retry-after") and slug(r) == "unavailable", (r.status_code, r.text)
        assert r.headers.get("connection") == "close"
        assert s.proc.wait(timeout=40) == 0
        s.proc = None
        s.start()
        again = s.post("fuelco", earn("DRAIN1", 5, "drain-ref-1"), msg_id="drain-1")
        assert again.status_code == 201, "the refused posting was not written"
    finally:
        s.close()


def test_an_http_1_0_post_expecting_100_continue_gets_only_its_answer(server):
    body = earn("H10", 5, "h10-ref").encode()
    headers = sign_bytes(server.secrets["fuelco"], "h10-expect", body)
    lines = [b"POST /v1/partners/fuelco/events HTTP/1.0", b"expect: 100-continue", b"content-length: %d" % len(body)]
    lines += [f"{k}: {v}".encode() for k, v in headers.items()]
    response, closed = until_closed(server, b"\r\n".join(lines) + b"\r\n\r\n" + body)
    assert closed
    assert b" 100 " not in response.split(b"\r\n", 1)[0], "RFC 9110 10.1.1: ignore 100-continue from HTTP/1.0"
    status, headers = head_of(response)
    assert status == "HTTP/1.0 201 Created", response[:400]
    server.accepted.add("h10-expect")
    assert json.loads(response.partition(b"\r\n\r\n")[2])["member_balance"] == 5


def test_a_malformed_chunk_is_the_clients_fault(server):
    """A chunk size the HTTP parser cannot read: 400 `malformed`, not a 503 and an error log."""
    head = request("POST", "/v1/partners/fuelco/events",
                   [b"content-type: application/json", b"transfer-encoding: chunked",
                    b"webhook-id: badchunk", b"webhook-timestamp: 1", b"webhook-signature: v1,x"])
    status, response, _ = raw(server, head + b"zz\r\nabc\r\n0\r\n\r\n")
    assert status == 400 and b"urn:clearhouse:problem:malformed" in response, response[:400]
    assert "request failed" not in server.read_log(), "no error logged for a client's mistake"
    assert_still_serving(server)


@pytest.mark.parametrize("coding, http10, status, problem", [
    ([b"transfer-encoding: gzip, chunked"], False, 501, b"not-implemented"),
    ([b"transfer-encoding: deflate", b"transfer-encoding: chunked"], False, 501, b"not-implemented"),
    ([b"transfer-encoding: identity, chunked"], False, 501, b"not-implemented"),
    ([b"transfer-encoding: chunked"], True, 400, b"malformed"),
])
def test_framing_another_hop_could_read_otherwise_is_refused_unread(server, coding, http10, status, problem):
    """Request smuggling (RFC 9112 §6.1): a correctly signed earn framed by a transfer coding
    the server does not decode, or by `transfer-encoding` in HTTP/1.0, is refused before its
    body is read (a proxy in front could read other bytes as the body), with a dated problem
    document, the connection closed, and nothing posted: the same earn framed plainly is then
    new (201)."""
    n = hashlib.sha256(b"|".join(coding) + (b"1.0" if http10 else b"")).hexdigest()[:12]
    msg_id, ref = f"te-{n}", f"te-ref-{n}"
    body = earn("TE1", 3, ref).encode()
    headers = sign_bytes(server.secrets["fuelco"], msg_id, body)
    lines = [f"{k}: {v}".encode() for k, v in headers.items()] + coding
    data = request("POST", "/v1/partners/fuelco/events", lines, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    if http10:
        data = data.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    response, closed = until_closed(server, data)
    assert closed, response[:400]
    line, headers = head_of(response)
    assert line.split(" ")[1] == str(status) and headers["connection"] == "close", response[:400]
    assert headers["date"].endswith(" GMT") and b"urn:clearhouse:problem:" + problem in response, response[:600]
    r = server.post("fuelco", earn("TE1", 3, ref), msg_id=msg_id)
    assert r.status_code == 201, ("the refused earn must not have been posted", r.status_code, r.text)
    server.accepted.add(msg_id)


# MARK: slow clients

def test_slow_clients_are_cut_off_while_others_are_served(server):
    results = {}

    def slow_head(k):
        # A head trickled a few bytes a second that never ends.
        chunks = [b"POST /v1/partners/fuelco/events HTTP/1.1\r\n"] + [b"x-slow-%d: a\r\n" % i for i in range(60)]
        results[("head", k)] = raw(server, None, timeout=CONNECTION_IDLE_SECONDS + 20, chunks=chunks, pause=0.5)

    def slow_body(k):
        body = earn(f"SLOW-{k}", 5, f"SLOW-R{k}").encode()
        headers = server.headers("fuelco", body.decode(), msg_id=f"slow_{k}")
        head = request("POST", "/v1/partners/fuelco/events",
                       [f"{n}: {v}".encode() for n, v in headers.items()] + [f"content-length: {len(body)}".encode()])
        chunks = [head] + [body[i:i + 1] for i in range(len(body))]
        results[("body", k)] = raw(server, None, timeout=REQUEST_READ_SECONDS + 20, chunks=chunks, pause=0.5)

    threads = [threading.Thread(target=slow_head, args=(k,)) for k in range(20)]
    threads += [threading.Thread(target=slow_body, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    # Meanwhile, everybody else is served at once.
    time.sleep(1)
    for i in range(20):
        started = time.monotonic()
        r = server.post("fuelco", earn("FAST", 1, f"FAST-R{i}"), msg_id=f"fast_{i}")
        assert r.status_code == 201 and time.monotonic() - started < 5
        server.accepted.add(f"fast_{i}")
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 25
    for (kind, k), (status, response, seconds) in results.items():
        limit = CONNECTION_IDLE_SECONDS if kind == "head" else REQUEST_READ_SECONDS
        assert status is None or status in (400, 408), (kind, response[:200])
        assert seconds < limit + 5, f"a slow {kind} was held {seconds:.1f} s"
    # The trickled bodies were never complete: nothing of them was written.
    for k in range(5):
        assert server.balance("fuelco", f"SLOW-{k}").json()["balance"] == 0
    assert_still_serving(server)
