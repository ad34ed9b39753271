"""Live suite for statements (CONTRACT §4, §8) and the accounting export: the real binary over
real TLS; signatures checked with the `cryptography` package, the books with `bean-check`
(the `beancount` package). Bounded: every request has a timeout.
"""
import base64
import csv
import decimal
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("CLEARHOUSE_BIN", os.path.join(ROOT, ".build", "debug", "clearhouse"))
BEAN_CHECK = os.path.join(os.path.dirname(os.path.realpath(__file__)), "..", "..", ".venv", "bin", "bean-check")


@pytest.fixture(scope="module")
def books():
    """Two runs of simulated trading, then `serve` over them."""
    tmp = tempfile.mkdtemp(prefix="clearhouse-statements-")
    certs, data, partners = (os.path.join(tmp, d) for d in ("certs", "data", "partners"))
    subprocess.run([os.path.join(ROOT, "ops", "certs"), certs], check=True, capture_output=True, timeout=60)
    shutil.copytree(os.path.join(ROOT, "partners"), partners)

    def ch(*args):
        r = subprocess.run([BIN, *args, "--data", data, "--partners", partners], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r.stdout

    ch("simulate", "--members", "200", "--events", "3000", "--seed", "61")
    ch("settle")
    ch("simulate", "--members", "200", "--events", "1500", "--seed", "62", "--force")
    ch("settle")
    proc = subprocess.Popen([BIN, "serve", "--port", "0", "--certs", certs, "--data", data, "--partners", partners],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "listening on https://" in line, line
    s = requests.Session()
    s.trust_env = False
    s.verify = os.path.join(certs, "ca.crt")
    yield {"url": "https://localhost:" + line.strip().rsplit(":", 1)[1], "session": s, "ch": ch, "tmp": tmp}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    shutil.rmtree(tmp, ignore_errors=True)


def get(books, path, partner="fuelco", **kw):
    headers = {"Authorization": f"Bearer dev-token-{partner}", **kw.pop("headers", {})}
    return books["session"].get(books["url"] + path, headers=headers, timeout=30, **kw)


def public_key(books):
    keys = books["session"].get(books["url"] + "/v1/keys", timeout=10).json()["keys"]
    x = keys[0]["x"]
    return keys[0]["kid"], Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)))


def test_a_downloaded_statement_is_signed_and_its_figures_come_from_its_rows(books):
    listing = get(books, "/v1/partners/fuelco/statements").json()
    assert [s["run"] for s in listing] == ["R000001", "R000002"]
    kid, key = public_key(books)
    for item in listing:
        run = item["run"]
        r = get(books, f"/v1/partners/fuelco/statements/{run}.csv")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert r.headers.get("content-encoding") == "gzip", "requests asks for gzip; the body arrives decoded"
        assert "content-digest" not in r.headers, "Content-Digest would be of the gzip bytes: left out"
        body = r.content
        digest = hashlib.sha256(body).digest()
        sig = dict(part.strip().split("=", 1) for part in r.headers["clearhouse-signature"].split(", "))
        assert sig["digest"].strip('"') == f"sha-256=:{base64.b64encode(digest).decode()}:"
        plain = get(books, f"/v1/partners/fuelco/statements/{run}.csv", headers={"Accept-Encoding": "identity"})
        assert plain.content == body and plain.headers["content-digest"] == sig["digest"].strip('"')
        assert sig["keyid"].strip('"') == kid and sig["alg"].strip('"') == "ed25519"
        manifest = f"clearhouse.statement.v1\nfuelco\n{run}\ncsv\n{base64.b64encode(digest).decode()}".encode()
        key.verify(base64.b64decode(sig["signature"].strip('"')), manifest)  # raises if forged
        # The figures, recomputed from the rows alone.
        rows = list(csv.DictReader(io.StringIO(body.decode("utf-8"))))
        sums = {}
        for row in rows:
            sums[row["type"]] = sums.get(row["type"], 0) + int(row["points"])
        issued = sums.get("points.earned", 0) - sums.get("points.earn_reversed", 0)
        redeemed = sums.get("points.redeemed", 0) - sums.get("points.redemption_reversed", 0)
        doc = get(books, f"/v1/partners/fuelco/statements/{run}.json").json()
        assert (doc["issued_points"], doc["redeemed_points"]) == (issued, redeemed)
        half_even = lambda points, price: int((decimal.Decimal(points) * price / 1000).quantize(0, decimal.ROUND_HALF_EVEN))
        assert doc["payable_minor"] == half_even(issued, doc["issue_price_per_1000"])
        assert doc["receivable_minor"] == half_even(redeemed, doc["redeem_credit_per_1000"])
        assert doc["net_minor"] == item["net_minor"] == doc["receivable_minor"] - doc["payable_minor"]
        assert len(doc["entries"]) == len(rows) == doc["entry_count"]
        # Runs never change: the ETag holds.
        again = get(books, f"/v1/partners/fuelco/statements/{run}.csv", headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304


def test_the_operators_statement_is_the_same_document(books):
    out = os.path.join(books["tmp"], "fuelco-R000001.csv")
    books["ch"]("statement", "fuelco", "R000001", "--output", out)
    with open(out, "rb") as f:
        assert f.read() == get(books, "/v1/partners/fuelco/statements/R000001.csv").content
    js = books["ch"]("statement", "fuelco", "R000002", "--format", "json")
    assert js.encode() == get(books, "/v1/partners/fuelco/statements/R000002.json").content


def test_no_partner_reads_another_partners_statements(books):
    for path in ["/v1/partners/fuelco/statements", "/v1/partners/fuelco/statements/R000001.csv",
                 "/v1/partners/fuelco/statements/R000001.json"]:
        assert get(books, path, partner="cinestar").status_code == 403
        r = books["session"].get(books["url"] + path, timeout=10)
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    assert get(books, "/v1/partners/fuelco/statements/R999999.csv").status_code == 404


def test_the_books_pass_bean_check_and_agree_with_the_runs(books):
    from beancount import loader
    path = os.path.join(books["tmp"], "books.beancount")
    books["ch"]("export", "--format", "beancount", "--output", path)
    check = subprocess.run([BEAN_CHECK, path], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    entries, errors, _ = loader.load_file(path)
    assert not errors
    balances = {}
    for e in entries:
        for p in getattr(e, "postings", None) or []:
            balances[p.account] = balances.get(p.account, decimal.Decimal(0)) + p.units.number
    net, margin, outstanding, price, transactions = {}, 0, {}, {}, 0
    for run in ("R000001", "R000002"):
        doc = json.loads(books["ch"]("runs", "show", run, "--json"))
        margin += doc["operator_margin_minor"]
        for p in doc["partners"]:
            net[p["partner"]] = net.get(p["partner"], 0) + p["net_minor"]
            outstanding[p["partner"]] = outstanding.get(p["partner"], 0) + p["issued_points"] - p["expired_points"]
            price[p["partner"]] = round(p["payable_minor"] * 1000 / p["issued_points"]) if p["issued_points"] else price.get(p["partner"])
            transactions += 2
        for f in doc["flows"]:
            outstanding[f["issuer"]] -= f["points"]
    for partner, n in net.items():
        account = "Assets:Partners:" + partner.capitalize()
        assert balances.get(account, 0) * 100 == -n, account
    # Every transaction balances, so the liability, the margin on redemptions and breakage
    # together hold the operator's margin of all runs.
    income = balances.get("Income:Margin", 0) + balances.get("Income:Breakage", 0)
    assert -(balances["Liabilities:Points:Outstanding"] + income) * 100 == margin
    # And the liability is the value of the points still outstanding, at their issuers' prices
    # (to within the rounding of each transaction).
    value = sum(points * price[p] / 1000 for p, points in outstanding.items())
    assert abs(-balances["Liabilities:Points:Outstanding"] * 100 - decimal.Decimal(value)) <= transactions


def test_bad_statement_and_export_requests_name_what_is_wrong(books):
    def run(*args):
        return subprocess.run([BIN, *args, "--data", os.path.join(books["tmp"], "data"),
                               "--partners", os.path.join(books["tmp"], "partners")], capture_output=True, text=True, timeout=60)
    for args, words in [(("statement", "fuelco", "R000001", "--format", "xml"), "--format"),
                        (("statement", "nobody", "R000001"), "no partner"),
                        (("statement", "fuelco", "R000042"), "no run"),
                        (("statement", "fuelco", "R000001", "--output", "/nonexistent/dir/x.csv"), "--output"),
                        (("export", "--format", "ledger"), "--format")]:
        r = run(*args)
        assert r.returncode == 1 and words in r.stderr, (args, r.stderr)


def test_output_never_replaces_the_data_a_database_or_a_device(books):
    """A typo in --output must not cost the journal, a ledger, a backup's copy or /dev/null."""
    import hashlib
    data = os.path.join(books["tmp"], "data")

    def run(*args):
        return subprocess.run([BIN, *args, "--data", data, "--partners", os.path.join(books["tmp"], "partners")],
                              capture_output=True, text=True, timeout=60)

    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    journal = os.path.join(data, "coalition.sqlite")
    ledger = os.path.join(data, "ledgers", "fuelco.sqlite")
    elsewhere = os.path.join(books["tmp"], "a-backup-copy.sqlite")
    with open(journal, "rb") as f, open(elsewhere, "wb") as g:
        g.write(f.read(4096))
    folder = os.path.join(books["tmp"], "a-folder")
    os.makedirs(folder, exist_ok=True)
    before = {p: digest(p) for p in (journal, ledger, elsewhere)}
    for args, words in [(("statement", "fuelco", "R000001", "--output", journal), "inside the data directory"),
                        (("export", "--output", ledger), "inside the data directory"),
                        (("statement", "fuelco", "R000001", "--output", os.path.join(data, "new.csv")), "inside the data directory"),
                        (("export", "--output", elsewhere), "SQLite database"),
                        (("statement", "fuelco", "R000001", "--output", "/dev/null"), "not a regular file"),
                        (("export", "--output", folder), "not a regular file")]:
        r = run(*args)
        assert r.returncode == 1 and words in r.stderr and "nothing was written" in r.stderr, (args, r.stderr)
    assert {p: digest(p) for p in before} == before
    assert not os.path.exists(os.path.join(data, "new.csv"))
    assert os.path.isdir(folder) and os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    # An earlier statement of the operator's is replaced, whole, owner-only.
    out = os.path.join(books["tmp"], "again.csv")
    with open(out, "w") as f:
        f.write("old")
    assert run("statement", "fuelco", "R000001", "--output", out).returncode == 0
    with open(out, "rb") as f:
        assert f.read() == get(books, "/v1/partners/fuelco/statements/R000001.csv").content
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert not [n for n in os.listdir(books["tmp"]) if n.endswith(".partial")]


def test_a_statement_streamed_to_an_http_1_0_client_is_not_chunked(books):
    """An HTTP/1.0 client cannot read chunks: the streamed statement ends with the connection."""
    import re
    import socket
    import ssl
    whole = get(books, "/v1/partners/fuelco/statements/R000001.csv", headers={"Accept-Encoding": "identity"})
    assert whole.status_code == 200
    port = int(books["url"].rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=books["session"].verify)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"GET /v1/partners/fuelco/statements/R000001.csv HTTP/1.0\r\n"
                        b"authorization: Bearer dev-token-fuelco\r\n\r\n")
            response = b""
            while part := tls.recv(65536):  # the server's close ends it (a timeout fails the test)
                response += part
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 "), head
    assert not re.search(rb"(?im)^transfer-encoding:", head), head
    assert re.search(rb"(?im)^connection: close", head), head
    assert body == whole.content
