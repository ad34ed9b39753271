"""Live suite: `clearhouse serve` over real TLS on loopback, driven by clients nobody here
wrote: the official `standardwebhooks` package signs events, `requests` and `curl` send them,
`sslyze` scans the TLS configuration. Run by ops/test (bounded: every request has a timeout).
"""
import datetime
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid

import pytest
import requests
from standardwebhooks.webhooks import Webhook

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("CLEARHOUSE_BIN", os.path.join(ROOT, ".build", "debug", "clearhouse"))


def der_sha256(pem_path):
    with open(pem_path) as f:
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(f.read())).hexdigest()


@pytest.fixture(scope="session")
def server():
    tmp = tempfile.mkdtemp(prefix="clearhouse-live-")
    certs = os.path.join(tmp, "certs")
    subprocess.run([os.path.join(ROOT, "ops", "certs"), certs], check=True, capture_output=True, timeout=60)
    partners = os.path.join(tmp, "partners")
    shutil.copytree(os.path.join(ROOT, "partners"), partners)
    # medipharm must use mutual TLS with its client certificate.
    with open(os.path.join(partners, "medipharm.toml"), "a") as f:
        f.write(f'client_cert_sha256 = "{der_sha256(os.path.join(certs, "client-medipharm.crt"))}"\n')
    proc = subprocess.Popen(
        [BIN, "serve", "--port", "0", "--data", os.path.join(tmp, "data"), "--partners", partners, "--certs", certs],
        stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "serve.log"), "w"), text=True)
    line = proc.stdout.readline()
    assert "listening on https://" in line, line
    port = int(line.strip().rsplit(":", 1)[1])
    with open(os.path.join(partners, "fuelco.toml"), "rb") as f:
        fuel = tomllib.load(f)
    with open(os.path.join(partners, "medipharm.toml"), "rb") as f:
        medi = tomllib.load(f)
    yield {"port": port, "certs": certs, "tmp": tmp, "partners": partners, "proc": proc,
           "fuel_secret": fuel["webhook_secrets"][0], "medi_secret": medi["webhook_secrets"][0]}
    proc.terminate()
    assert proc.wait(timeout=30) == 0, "serve exits 0 on SIGTERM"
    with open(os.path.join(tmp, "serve.log")) as f:
        log = f.read()
    assert "status=201" in log, "one structured line per request"
    assert "TLS handshake failed" in log, "the refused old TLS versions and scans are said in the log"
    import re
    assert not re.search(r"/members/[^{]", log) and "LIVE-1" not in log, "a path names a member: the log has the route, never the path"
    for secret in ("whsec_", "v1,", "dev-token-", "Bearer", fuel["webhook_secrets"][0][6:20]):
        assert secret not in log, f"the server log contains {secret!r}"
    shutil.rmtree(tmp, ignore_errors=True)


def session(server, cert=None):
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE must not override our private CA
    s.verify = os.path.join(server["certs"], "ca.crt")
    if cert:
        s.cert = (os.path.join(server["certs"], f"client-{cert}.crt"), os.path.join(server["certs"], f"client-{cert}.key"))
    return s


def signed_post(server, partner, body, secret, msg_id=None, when=None, cert=None, tamper=None):
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    when = when or datetime.datetime.now(tz=datetime.timezone.utc)
    signature = Webhook(secret).sign(msg_id, when, body)
    headers = {"content-type": "application/json", "webhook-id": msg_id,
               "webhook-timestamp": str(int(when.timestamp())), "webhook-signature": signature}
    sent = tamper(body) if tamper else body
    return session(server, cert).post(f"https://localhost:{server['port']}/v1/partners/{partner}/events",
                                      data=sent.encode(), headers=headers, timeout=10)


def earn(member, points, ref):
    return json.dumps({"type": "points.earned", "data": {"member": member, "points": points, "reference": ref}})


def slug(r):
    assert r.headers["content-type"] == "application/problem+json", r.text
    return r.json()["type"].rsplit(":", 1)[1]


def test_event_signed_by_standardwebhooks_is_accepted_and_replayed(server):
    body = earn("LIVE-1", 250, "LIVE-R1")
    first = signed_post(server, "fuelco", body, server["fuel_secret"], msg_id="msg_live_1")
    assert first.status_code == 201, first.text
    assert first.json()["member_balance"] == 250 and first.json()["partner"] == "fuelco"
    again = signed_post(server, "fuelco", body, server["fuel_secret"], msg_id="msg_live_1")
    assert again.status_code == 200 and again.text == first.text
    by_reference = signed_post(server, "fuelco", body, server["fuel_secret"])
    assert by_reference.status_code == 200 and by_reference.text == first.text


def test_tampered_body_is_refused(server):
    body = earn("LIVE-2", 10, "LIVE-R2")
    r = signed_post(server, "fuelco", body, server["fuel_secret"], tamper=lambda b: b.replace("10", "99"))
    assert r.status_code == 401 and slug(r) == "bad-signature"


def test_other_partners_secret_is_refused(server):
    r = signed_post(server, "fuelco", earn("LIVE-3", 10, "LIVE-R3"), server["medi_secret"])
    assert r.status_code == 401 and slug(r) == "bad-signature"


@pytest.mark.parametrize("offset", [-301, 301])
def test_stale_and_future_timestamps(server, offset):
    when = datetime.datetime.now(tz=datetime.timezone.utc) + datetime.timedelta(seconds=offset)
    r = signed_post(server, "fuelco", earn("LIVE-4", 10, f"LIVE-R4{offset}"), server["fuel_secret"], when=when)
    assert r.status_code == 401 and slug(r) == "stale-timestamp"


def test_mutual_tls_right_wrong_and_no_certificate(server):
    ok = signed_post(server, "medipharm", earn("LIVE-5", 10, "LIVE-R5"), server["medi_secret"], cert="medipharm")
    assert ok.status_code == 201, ok.text
    wrong = signed_post(server, "medipharm", earn("LIVE-5", 10, "LIVE-R6"), server["medi_secret"], cert="fuelco")
    assert wrong.status_code == 403 and slug(wrong) == "wrong-partner"
    none = signed_post(server, "medipharm", earn("LIVE-5", 10, "LIVE-R7"), server["medi_secret"])
    assert none.status_code == 403 and slug(none) == "wrong-partner"
    # Another partner's certificate is refused even where no certificate is required.
    other = signed_post(server, "fuelco", earn("LIVE-5", 10, "LIVE-R7b"), server["fuel_secret"], cert="medipharm")
    assert other.status_code == 403 and slug(other) == "wrong-partner"
    # Reads for a mutual-TLS partner need its certificate; its bearer token alone is not enough.
    url = f"https://localhost:{server['port']}/v1/partners/medipharm/members/LIVE-5/balance"
    assert session(server, "medipharm").get(url, timeout=10).json() == {"member": "LIVE-5", "balance": 10}
    bearer_only = session(server).get(url, headers={"authorization": "Bearer dev-token-medipharm"}, timeout=10)
    assert bearer_only.status_code == 403 and slug(bearer_only) == "wrong-partner"
    # No credential of this partner at all (nothing, or a certificate that is nobody's: fuelco
    # names none here) is 401 with a challenge (CONTRACT §4: "None or wrong: 401").
    for anonymous in [session(server), session(server, "fuelco")]:
        r = anonymous.get(url, timeout=10)
        assert r.status_code == 401 and slug(r) == "unauthorized", r.text
        assert r.headers.get("www-authenticate", "").startswith("Bearer")
    # The partner's token with a certificate that is not its own: 403, as without one.
    stranger = session(server, "fuelco").get(url, headers={"authorization": "Bearer dev-token-medipharm"}, timeout=10)
    assert stranger.status_code == 403 and slug(stranger) == "wrong-partner", stranger.text
    # Its certificate with another partner's token beside it: refused, as on a posting.
    mixed = session(server, "medipharm").get(url, headers={"authorization": "Bearer dev-token-fuelco"}, timeout=10)
    assert mixed.status_code == 403 and slug(mixed) == "wrong-partner"
    # Its certificate with a wrong token beside it: the token is not ignored (CONTRACT §4:
    # wrong credentials are 401); with its own token beside it, the read is answered.
    for header in ["Bearer not-a-token", "Basic bWVkaTpwYXNz"]:
        garbage = session(server, "medipharm").get(url, headers={"authorization": header}, timeout=10)
        assert garbage.status_code == 401 and slug(garbage) == "unauthorized", garbage.text
        assert garbage.headers.get("www-authenticate", "").startswith("Bearer")
    own = session(server, "medipharm").get(url, headers={"authorization": "Bearer dev-token-medipharm"}, timeout=10)
    assert own.status_code == 200, own.text
    # The same for its statements: its certificate reads them, its token alone does not, and
    # its certificate reads no other partner's.
    statements = f"https://localhost:{server['port']}/v1/partners/medipharm/statements"
    assert session(server, "medipharm").get(statements, timeout=10).status_code == 200
    assert session(server).get(statements, headers={"authorization": "Bearer dev-token-medipharm"}, timeout=10).status_code == 403
    other_statements = f"https://localhost:{server['port']}/v1/partners/fuelco/statements"
    assert session(server, "medipharm").get(other_statements, timeout=10).status_code == 403


def test_body_just_under_and_over_64_kib(server):
    base = earn("LIVE-6", 5, "LIVE-R8")
    under = base + " " * (65536 - len(base))
    assert signed_post(server, "fuelco", under, server["fuel_secret"]).status_code == 201
    over = under.replace("LIVE-R8", "LIVE-R9") + " "
    r = signed_post(server, "fuelco", over, server["fuel_secret"])
    assert r.status_code == 413 and slug(r) == "too-large"


def test_a_kept_alive_connection_survives_a_refused_body(server):
    """After a body refused unread (413 by its length, or a chunked body to an unknown
    partner), the answer says `connection: close`, so a client with a connection pool sends
    its next request on a new connection: no request of a partner's session fails."""
    s = session(server)
    url = f"https://localhost:{server['port']}/v1/partners/fuelco/events"
    for attempt in range(3):
        big = "x" * 70_000
        r = s.post(url, data=big.encode(), headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 413 and r.headers.get("connection") == "close", r.headers
        chunked = s.post(f"https://localhost:{server['port']}/v1/partners/nobody/events", data=iter([b"{", b"}"]),
                         headers={"content-type": "application/json"}, timeout=10)
        assert chunked.status_code == 404 and chunked.headers.get("connection") == "close", chunked.headers
        time.sleep(0.1)  # past the server's closing of those connections
        body = earn("LIVE-KA", 3, f"LIVE-KA-{attempt}-{uuid.uuid4().hex[:8]}")
        msg_id = f"msg_{uuid.uuid4().hex}"
        when = datetime.datetime.now(tz=datetime.timezone.utc)
        headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
                   "webhook-signature": Webhook(server["fuel_secret"]).sign(msg_id, when, body)}
        ok = s.post(url, data=body.encode(), headers=headers, timeout=10)
        assert ok.status_code == 201, ok.text


def test_serve_without_a_statement_key_makes_one_in_the_data_directory_and_keeps_it():
    """CONTRACT §10 asks only for server.crt and server.key: without statement.key, serve
    starts, makes an owner-only key in --data and signs with the same key after a restart."""
    tmp = tempfile.mkdtemp(prefix="clearhouse-live-key-")
    try:
        certs = os.path.join(tmp, "certs")
        subprocess.run([os.path.join(ROOT, "ops", "certs"), certs], check=True, capture_output=True, timeout=60)
        os.remove(os.path.join(certs, "statement.key"))
        data = os.path.join(tmp, "data")
        kids = []
        for _ in range(2):
            proc = subprocess.Popen([BIN, "serve", "--port", "0", "--data", data, "--partners", os.path.join(ROOT, "partners"),
                                     "--certs", certs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                line = proc.stdout.readline()
                assert "listening on https://" in line, proc.stderr.read() if proc.poll() is not None else line
                port = int(line.strip().rsplit(":", 1)[1])
                s = requests.Session()
                s.trust_env = False
                s.verify = os.path.join(certs, "ca.crt")
                kids.append(s.get(f"https://localhost:{port}/v1/keys", timeout=10).json()["keys"][0]["kid"])
            finally:
                proc.terminate()
                assert proc.wait(timeout=30) == 0
        key = os.path.join(data, "statement.key")
        assert os.stat(key).st_mode & 0o777 == 0o600
        assert kids[0] == kids[1], "the same key after a restart"
        assert not os.path.exists(os.path.join(certs, "statement.key"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_serve_on_a_port_in_use_says_so_in_one_line_and_exits_2(server):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([BIN, "serve", "--port", str(port), "--data", os.path.join(server["tmp"], "data-port"),
                            "--partners", server["partners"], "--certs", server["certs"]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert f"clearhouse serve: cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr, r.stderr


def curl(server, *args):
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", os.path.join(server["certs"], "ca.crt"),
                          "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=20)
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def test_a_statement_row_changed_after_the_first_download_is_never_sent():
    """A statement's digest is remembered after its first download; a ledger row changed
    afterwards (by hand, around the triggers) must not reach the partner on a later download:
    that download checks the rows as it streams and stops before the batch that holds it
    (without the check it would send every row and only fail its digest at the very end)."""
    import sqlite3
    tmp = tempfile.mkdtemp(prefix="clearhouse-live-stmt-")
    try:
        certs, data, partners = (os.path.join(tmp, d) for d in ("certs", "data", "partners"))
        subprocess.run([os.path.join(ROOT, "ops", "certs"), certs], check=True, capture_output=True, timeout=60)
        shutil.copytree(os.path.join(ROOT, "partners"), partners)
        for i in range(1, 4):
            body = json.dumps({"type": "points.earned", "data": {"member": "M1", "points": 100 + i, "reference": f"LIVE-S{i}"}})
            post = subprocess.run([BIN, "post", "--partner", "fuelco", "--data", data, "--partners", partners],
                                  input=body, capture_output=True, text=True, timeout=60)
            assert post.returncode == 0, post.stderr
        assert subprocess.run([BIN, "settle", "--data", data, "--partners", partners], capture_output=True, timeout=60).returncode == 0
        log = open(os.path.join(tmp, "serve.log"), "w")
        proc = subprocess.Popen([BIN, "serve", "--port", "0", "--data", data, "--partners", partners, "--certs", certs],
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            line = proc.stdout.readline()
            assert "listening on https://" in line, line
            url = f"https://localhost:{line.strip().rsplit(':', 1)[1]}/v1/partners/fuelco/statements/R000001.csv"
            get = ["curl", "-sS", "--max-time", "20", "--cacert", os.path.join(certs, "ca.crt"),
                   "-H", "Authorization: Bearer dev-token-fuelco", url]
            first = subprocess.run(get, capture_output=True, text=True, timeout=30)
            assert first.returncode == 0 and ",LIVE-S2," in first.stdout, first.stderr
            db = sqlite3.connect(os.path.join(data, "ledgers", "fuelco.sqlite"))
            db.executescript("DROP TRIGGER entry_append_only_update; UPDATE entry SET points = 999 WHERE sequence = 2;")
            db.close()
            again = subprocess.run(get, capture_output=True, text=True, timeout=30)
            assert again.returncode != 0, "a statement with a changed row must not complete"
            assert ",999," not in again.stdout and ",LIVE-S2," not in again.stdout, again.stdout
        finally:
            proc.terminate()
            assert proc.wait(timeout=30) == 0
        with open(os.path.join(tmp, "serve.log")) as f:
            assert "damaged at sequence 2" in f.read(), "the operator is told which row"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_curl_reads(server):
    base = f"https://localhost:{server['port']}"
    assert curl(server, f"{base}/healthz")[0] == 200
    code, body = curl(server, "-H", "Authorization: Bearer dev-token-fuelco", f"{base}/v1/partners/fuelco/members/LIVE-1/balance")
    assert code == 200 and json.loads(body) == {"member": "LIVE-1", "balance": 250}
    assert curl(server, "-H", "Authorization: Bearer dev-token-cinestar", f"{base}/v1/partners/fuelco/members/LIVE-1/balance")[0] == 403
    assert curl(server, f"{base}/v1/partners/fuelco/members/LIVE-1/balance")[0] == 401
    assert curl(server, "-X", "POST", "-H", "content-type: text/plain", "-d", "x", f"{base}/v1/partners/nobody/events")[0] == 404
    # HEAD, then GET on the same kept-alive connection: the HEAD answer has no body, so the
    # connection stays in step.
    out = subprocess.run(["curl", "-sS", "-v", "--max-time", "10", "--cacert", os.path.join(server["certs"], "ca.crt"),
                          "-I", f"{base}/healthz", "--next", "--cacert", os.path.join(server["certs"], "ca.crt"), f"{base}/healthz"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and out.stdout.count("HTTP/1.1 200") == 1 and out.stdout.rstrip().endswith('{"status":"ok"}'), out.stdout
    assert "Re-using existing connection" in out.stderr, out.stderr[-1500:]


def test_expect_100_continue_gets_its_interim_answer(server):
    """curl asks `Expect: 100-continue` before a body past 1 KiB and waits (1 s) for the
    interim answer: the server sends it once nothing before the body refuses the request,
    and none when the length alone refuses it."""
    body = earn("LIVE-CONT", 7, "LIVE-CONT-1")
    body = body[:-2] + "}" + " " * 2000 + "}"
    msg_id = f"msg_{uuid.uuid4().hex}"
    when = datetime.datetime.now(tz=datetime.timezone.utc)
    signature = Webhook(server["fuel_secret"]).sign(msg_id, when, body)
    url = f"https://localhost:{server['port']}/v1/partners/fuelco/events"
    out = subprocess.run(["curl", "-sS", "-v", "--max-time", "10", "--expect100-timeout", "8", "--cacert", os.path.join(server["certs"], "ca.crt"),
                          "-H", "Expect: 100-continue", "-H", "content-type: application/json", "-H", f"webhook-id: {msg_id}",
                          "-H", f"webhook-timestamp: {int(when.timestamp())}", "-H", f"webhook-signature: {signature}",
                          "--data-binary", body, "-w", "\n%{http_code}", url], capture_output=True, text=True, timeout=20)
    assert "< HTTP/1.1 100 Continue" in out.stderr, out.stderr[-2000:]
    assert out.stdout.rpartition("\n")[2] == "201", out.stdout
    over = subprocess.run(["curl", "-sS", "-v", "--max-time", "10", "--expect100-timeout", "8", "--cacert", os.path.join(server["certs"], "ca.crt"),
                           "-H", "Expect: 100-continue", "-H", "content-type: application/json", "--data-binary", "x" * 70_000,
                           "-w", "\n%{http_code}", url], capture_output=True, text=True, timeout=20)
    assert "100 Continue" not in over.stderr and over.stdout.rpartition("\n")[2] == "413", over.stderr[-2000:]


def test_old_tls_versions_are_refused(server):
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "--tls-max", "1.1", "--cacert", os.path.join(server["certs"], "ca.crt"),
                          f"https://localhost:{server['port']}/healthz"], capture_output=True, text=True, timeout=20)
    assert out.returncode != 0


def test_sslyze_mozilla_intermediate(server):
    sslyze = os.path.join(os.path.dirname(sys.executable), "sslyze")
    out = subprocess.run([sslyze, "--mozilla_config=intermediate", "--certinfo_ca_file", os.path.join(server["certs"], "ca.crt"),
                          f"localhost:{server['port']}"],
                         capture_output=True, text=True, timeout=300)
    # sslyze exits 0 even when it could not connect: read the verdict.
    assert "OK - Compliant" in out.stdout, out.stdout[-3000:]


def test_openapi_document_is_valid_and_every_route_answers(server):
    import yaml
    from openapi_spec_validator import validate
    with open(os.path.join(ROOT, "docs", "openapi.yaml")) as f:
        spec = yaml.safe_load(f)
    validate(spec)
    s = session(server)
    for path, item in spec["paths"].items():
        for method in item:
            url = f"https://localhost:{server['port']}" + path.replace("{partner}", "fuelco").replace("{member}", "M1").replace("{run}", "R000001")
            r = s.request(method.upper(), url, timeout=10)
            assert str(r.status_code) in item[method]["responses"], f"{method} {path}: {r.status_code} not documented"
            if r.status_code == 404:
                assert r.json()["type"] != "urn:clearhouse:problem:not-found", f"{method} {path} is documented but not served"


def test_a_streamed_oversize_body_is_cut_off_early(server):
    """A client streaming a huge chunked body is refused and cut off long before it has sent
    it all: the limit is enforced while reading, and the connection is closed rather than
    drained. A raw TLS socket counts what was really written."""
    import socket
    ctx = ssl.create_default_context(cafile=os.path.join(server["certs"], "ca.crt"))
    head = (f"POST /v1/partners/fuelco/events HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            f"transfer-encoding: chunked\r\nwebhook-id: msg_stream\r\nwebhook-timestamp: 1\r\nwebhook-signature: v1,AAAA\r\n\r\n")
    chunk = f"{1 << 20:x}\r\n".encode() + b" " * (1 << 20) + b"\r\n"
    sent_mib = 0
    with socket.create_connection(("localhost", server["port"]), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(head.encode())
            try:
                while sent_mib < 1024:  # 1 GiB if the server kept reading
                    s.sendall(chunk)
                    sent_mib += 1
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, socket.timeout, OSError):
                pass
    # The server stops reading within Limits.refusedBodyDrainMillisecondsMax plus the TLS
    # shutdown timeout (~120 ms); on loopback that is still some tens of MiB.
    assert sent_mib < 256, f"the server kept reading: {sent_mib} MiB went through"


def test_a_client_that_breaks_off_mid_body_is_not_a_server_error(server):
    """A request head and part of its body, then the connection closed: the client's failure.
    It must not count as a 5xx (the runbook alerts on those) nor log an error."""
    import socket
    url = f"https://localhost:{server['port']}/metrics"

    def counted(status_prefix):
        lines = [l for l in session(server).get(url, timeout=10).text.splitlines()
                 if l.startswith("clearhouse_http_requests_total") and 'route="/v1/partners/{partner}/events"' in l
                 and f'status="{status_prefix}' in l]
        return sum(float(l.rsplit(" ", 1)[1]) for l in lines)

    before = counted("4")
    ctx = ssl.create_default_context(cafile=os.path.join(server["certs"], "ca.crt"))
    for _ in range(3):
        with socket.create_connection(("localhost", server["port"]), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"POST /v1/partners/fuelco/events HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                          b"content-length: 500\r\nwebhook-id: msg_cut\r\nwebhook-timestamp: 1\r\nwebhook-signature: v1,AAAA\r\n\r\n{\"type\":")
                time.sleep(0.1)
    # Wait (bounded) until the server has finished with all three, counted as 4xx.
    deadline = time.monotonic() + 15
    while counted("4") < before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counted("4") >= before + 3, "the three cut-short requests were not counted as client errors"
    assert counted("5") == 0


def test_oversize_headers_are_refused(server):
    """Headers over the decoder's limit: refused (a 4xx, or the connection closed before a
    head was built), never a 5xx; and the server goes on answering."""
    r = None
    try:
        r = session(server).get(f"https://localhost:{server['port']}/healthz", headers={"x-junk": "a" * 200_000}, timeout=10)
    except requests.exceptions.ConnectionError:
        pass
    if r is not None:
        assert 400 <= r.status_code < 500, r.status_code
    # Over our own, smaller limit but within the decoder's: a problem document.
    big = session(server).get(f"https://localhost:{server['port']}/healthz", headers={"x-junk": "a" * 20_000}, timeout=10)
    assert big.status_code == 400 and slug(big) == "malformed", big.text
    assert session(server).get(f"https://localhost:{server['port']}/healthz", timeout=10).status_code == 200
