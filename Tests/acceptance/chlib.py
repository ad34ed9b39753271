"""Black-box helpers for the Clearhouse acceptance suite (written from CONTRACT.md only)."""
import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import ssl
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("CLEARHOUSE_BIN", os.path.join(ROOT, ".build", "debug", "clearhouse"))


def _development_certificates():
    """A CA, a server certificate for localhost/127.0.0.1 and client certificates, made
    once per run by ops/certs (or taken from CLEARHOUSE_ACCEPTANCE_CERTS)."""
    given = os.environ.get("CLEARHOUSE_ACCEPTANCE_CERTS")
    if given:
        return given
    import atexit
    import shutil
    import tempfile
    tmp = tempfile.mkdtemp(prefix="clearhouse-acceptance-certs-")
    atexit.register(shutil.rmtree, tmp, True)
    subprocess.run([os.path.join(ROOT, "ops", "certs"), os.path.join(tmp, "certs")], check=True, capture_output=True, timeout=120)
    return os.path.join(tmp, "certs")


CERTS = _development_certificates()
CA = os.path.join(CERTS, "ca.crt")


def new_secret():
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sha256_hex(b):
    return hashlib.sha256(b).hexdigest()


def cert_sha256(path):
    out = subprocess.run(["openssl", "x509", "-in", path, "-outform", "DER"], capture_output=True, check=True, timeout=20).stdout
    return sha256_hex(out)


def sign(secret, msg_id, ts, body: bytes):
    key = base64.b64decode(secret[len("whsec_"):])
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def write_toml(path, d):
    with open(path, "w") as f:
        for k, v in d.items():
            f.write(f"{k} = {toml_value(v)}\n")


def uid(prefix="x"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- notice receiver
class Receiver:
    """HTTPS receiver (cert signed by the dev CA) that records every request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []           # dicts: path, headers, body, time, status
        self.fail_first = {}         # path -> number of 500s still to send
        self.redirect = {}           # path -> Location for a 302
        self.status = {}             # path -> status to answer instead of 200
        rec = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length", "0") or 0)
                body = self.rfile.read(n) if n else b""
                with rec.lock:
                    left = rec.fail_first.get(self.path, 0)
                    status = 500 if left > 0 else rec.status.get(self.path, 200)
                    if left > 0:
                        rec.fail_first[self.path] = left - 1
                    rec.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                         "body": body, "time": time.time(), "status": status})
                loc = rec.redirect.get(self.path)
                if loc:
                    with rec.lock:
                        rec.requests[-1]["status"] = 302
                    self.send_response(302)
                    self.send_header("location", loc)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(CERTS, "server.crt"), os.path.join(CERTS, "server.key"))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"https://127.0.0.1:{self.port}{path}"

    def matching(self, pred):
        with self.lock:
            return [r for r in self.requests if pred(r)]

    def wait_for(self, pred, count=1, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = self.matching(pred)
            if len(got) >= count:
                return got
            time.sleep(0.2)
        return self.matching(pred)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- environment
class Env:
    """One partners/ + data/ directory, optionally with a running `serve`."""

    def __init__(self, root, receiver=None, partners=None, coalition=None, tag=None):
        self.root = str(root)
        self.pdir = os.path.join(self.root, "partners")
        self.data = os.path.join(self.root, "data")
        os.makedirs(self.pdir, exist_ok=True)
        self.tag = tag or uid("env")
        self.receiver = receiver
        self.proc = None
        self.port = None
        self.secrets = {}
        self.tokens = {}
        self.notice_secrets = {}
        self.partners = {}
        self.coalition = {"currency": "EUR", "points_expire_after_days": 1095, "notice_allow_private_networks": True}
        if coalition:
            self.coalition.update(coalition)
        write_toml(os.path.join(self.pdir, "coalition.toml"), self.coalition)
        for pid, extra in (partners or default_partners()).items():
            self.add_partner(pid, **extra)

    def add_partner(self, pid, **extra):
        ws = extra.pop("_webhook_secrets", None) or [new_secret()]
        tok = f"tok-{pid}-{secrets.token_hex(8)}"
        ns = new_secret()
        d = {"id": pid, "name": f"{pid.title()} Ltd", "issue_price_per_1000": 1000, "redeem_credit_per_1000": 900,
             "webhook_secrets": ws, "api_token_sha256": sha256_hex(tok.encode()),
             "notice_url": self.receiver.url(f"/{self.tag}/{pid}") if self.receiver else f"https://127.0.0.1:9/{pid}",
             "notice_secret": ns, "notice_ca_file": CA}
        d.update(extra)
        self.secrets[pid] = ws
        self.tokens[pid] = tok
        self.notice_secrets[pid] = ns
        self.partners[pid] = d
        write_toml(os.path.join(self.pdir, f"{pid}.toml"), d)

    # ------------------------------------------------ CLI
    def cli(self, *args, input=None, timeout=60, faketime=None, env=None, cwd=None, defaults=True):
        cmd = [BIN, *args]
        if defaults:
            cmd += ["--data", self.data, "--partners", self.pdir]
        if faketime:
            cmd = ["faketime", "-f", faketime] + cmd
        e = dict(os.environ)
        if env:
            e.update(env)
        return subprocess.run(cmd, input=input, capture_output=True, timeout=timeout, env=e, cwd=cwd or self.root)

    def post_cli(self, partner, body, webhook_id=None, faketime=None):
        args = ["post", "--partner", partner]
        if webhook_id:
            args += ["--webhook-id", webhook_id]
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.cli(*args, input=raw, faketime=faketime)

    def settle(self, through=None, faketime=None):
        args = ["settle", "--json"]
        if through:
            args += ["--through", through]
        r = self.cli(*args, faketime=faketime)
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
        return json.loads(r.stdout)

    # ------------------------------------------------ serve
    def start(self, extra_env=None, timeout=20):
        assert self.proc is None
        e = dict(os.environ)
        if extra_env:
            e.update(extra_env)
        self.out_path = os.path.join(self.root, f"serve-{uid('o')}.out")
        self.err_path = self.out_path + ".err"
        self.proc = subprocess.Popen([BIN, "serve", "--data", self.data, "--partners", self.pdir, "--host", "127.0.0.1",
                                      "--port", "0", "--certs", CERTS],
                                     stdout=open(self.out_path, "wb"), stderr=open(self.err_path, "wb"), env=e, cwd=self.root)
        deadline = time.time() + timeout
        import re
        while time.time() < deadline:
            txt = open(self.out_path, "rb").read().decode(errors="replace")
            m = re.search(r"https://127\.0\.0\.1:(\d+)", txt)
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {open(self.err_path).read()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("serve did not report its port")

    def stop(self, timeout=20):
        if self.proc is None:
            return None
        p, self.proc = self.proc, None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
                return "killed"
        return p.returncode

    @property
    def base(self):
        return f"https://127.0.0.1:{self.port}"

    # ------------------------------------------------ HTTP
    def post(self, partner, body, webhook_id=None, ts=None, secret=None, signature=None, headers=None,
             content_type="application/json", cert=None, path_partner=None, sign_as=None):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        webhook_id = webhook_id or uid("msg")
        ts = int(time.time()) if ts is None else ts
        secret = secret or (self.secrets.get(sign_as or partner) or [new_secret()])[0]
        h = {"webhook-id": str(webhook_id), "webhook-timestamp": str(ts),
             "webhook-signature": signature if signature is not None else sign(secret, webhook_id, ts, raw)}
        if content_type is not None:
            h["content-type"] = content_type
        if headers:
            for k, v in headers.items():
                if v is None:
                    h.pop(k, None)
                else:
                    h[k] = v
        return requests.post(f"{self.base}/v1/partners/{path_partner or partner}/events", data=raw, headers=h,
                             verify=CA, cert=cert, timeout=20)

    def get(self, path, partner=None, token=None, cert=None, headers=None):
        h = dict(headers or {})
        if token is None and partner is not None:
            token = self.tokens[partner]
        if token:
            h["authorization"] = f"Bearer {token}"
        return requests.get(f"{self.base}{path}", headers=h, verify=CA, cert=cert, timeout=20)

    def balance(self, partner, member):
        r = self.get(f"/v1/partners/{partner}/members/{member}/balance", partner)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()["balance"]


def default_partners():
    return {
        "alpha": {"issue_price_per_1000": 1000, "redeem_credit_per_1000": 900, "_webhook_secrets": [new_secret(), new_secret()]},
        "beta": {"issue_price_per_1000": 1005, "redeem_credit_per_1000": 1000},
        "gamma": {"issue_price_per_1000": 1, "redeem_credit_per_1000": 1005},
    }


def earn(member, points, ref, **kw):
    return {"type": "points.earned", "data": {"member": member, "points": points, "reference": ref, **kw}}


def redeem(member, points, ref, **kw):
    return {"type": "points.redeemed", "data": {"member": member, "points": points, "reference": ref, **kw}}


def earn_rev(member, points, ref, orig):
    return {"type": "points.earn_reversed", "data": {"member": member, "points": points, "reference": ref,
                                                     "original_reference": orig}}


def redeem_rev(member, points, ref, orig):
    return {"type": "points.redemption_reversed", "data": {"member": member, "points": points, "reference": ref,
                                                           "original_reference": orig}}
