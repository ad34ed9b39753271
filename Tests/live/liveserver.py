"""A `clearhouse serve` of its own for a live test: certificates, a copy of the sample
partners, a data directory (anywhere: the disk test puts it on a small tmpfs), and signed
posting with the official `standardwebhooks` package."""
import datetime
import json
import os
import shutil
import subprocess
import tempfile
import tomllib
import uuid

import requests
from standardwebhooks.webhooks import Webhook

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("CLEARHOUSE_BIN", os.path.join(ROOT, ".build", "debug", "clearhouse"))


class LiveServer:
    def __init__(self, data=None, rate_limits=True):
        self.tmp = tempfile.mkdtemp(prefix="clearhouse-live-")
        self.certs = os.path.join(self.tmp, "certs")
        subprocess.run([os.path.join(ROOT, "ops", "certs"), self.certs], check=True, capture_output=True, timeout=60)
        self.partners = os.path.join(self.tmp, "partners")
        shutil.copytree(os.path.join(ROOT, "partners"), self.partners)
        if not rate_limits:
            for name in os.listdir(self.partners):
                path = os.path.join(self.partners, name)
                with open(path) as f:
                    lines = [l for l in f if not l.startswith("rate_per_second")]
                with open(path, "w") as f:
                    f.writelines(lines)
        self.data = data or os.path.join(self.tmp, "data")
        self.secrets = {}
        for name in ("freshmart", "fuelco", "medipharm", "cinestar"):
            with open(os.path.join(self.partners, f"{name}.toml"), "rb") as f:
                self.secrets[name] = tomllib.load(f)["webhook_secrets"][0]
        self.proc = None
        self.http = requests.Session()
        self.http.trust_env = False
        self.http.verify = os.path.join(self.certs, "ca.crt")

    def start(self):
        self.log = open(os.path.join(self.tmp, "serve.log"), "a")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--port", "0", "--data", self.data, "--partners", self.partners, "--certs", self.certs],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        assert "listening on https://" in line, f"serve did not start: {line!r}; log: {self.read_log()[-2000:]}"
        self.port = int(line.strip().rsplit(":", 1)[1])
        self.url = f"https://localhost:{self.port}"
        return self

    def read_log(self):
        with open(os.path.join(self.tmp, "serve.log")) as f:
            return f.read()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            code = self.proc.wait(timeout=40)
            self.proc = None
            return code
        return None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def ch(self, *args, check=True, timeout=120):
        r = subprocess.run([BIN, *args, "--data", self.data, "--partners", self.partners],
                           capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"clearhouse {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def headers(self, partner, body, msg_id=None, when=None):
        msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
        when = when or datetime.datetime.now(tz=datetime.timezone.utc)
        return {"content-type": "application/json", "webhook-id": msg_id,
                "webhook-timestamp": str(int(when.timestamp())),
                "webhook-signature": Webhook(self.secrets[partner]).sign(msg_id, when, body)}

    def post(self, partner, body, msg_id=None, timeout=15):
        return self.http.post(f"{self.url}/v1/partners/{partner}/events", data=body.encode(),
                              headers=self.headers(partner, body, msg_id), timeout=timeout)

    def balance(self, partner, member):
        return self.http.get(f"{self.url}/v1/partners/{partner}/members/{member}/balance",
                             headers={"authorization": f"Bearer dev-token-{partner}"}, timeout=15)

    def close(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def earn(member, points, ref):
    return json.dumps({"type": "points.earned", "data": {"member": member, "points": points, "reference": ref}})


def slug(r):
    assert r.headers["content-type"] == "application/problem+json", r.text
    return r.json()["type"].rsplit(":", 1)[1]
