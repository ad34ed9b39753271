#!/usr/bin/env python3
"""Crash test (issue 7): `clearhouse serve` on loopback takes signed events from several
concurrent clients while it is killed with SIGKILL at random moments, and restarted each time;
`clearhouse settle` is killed in the middle of runs, and the server is killed while it delivers
settlement notices to a slow partner endpoint. At the end:

- every event that got a 2xx is in its partner's ledger exactly once;
- every event that got no answer is there at most once;
- `clearhouse verify` passes (it recomputes every run from the raw journal);
- each run's figures equal a recomputation here, from the ledger files;
- every notice of every committed run is delivered or pending (none lost).

Usage: crash-test.py --bin BIN [--kills 20] [--seconds 120] [--seed N]
Bounded: at most --kills kills and --seconds of load; every request has a timeout.
"""
import argparse
import datetime
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import requests
from standardwebhooks.webhooks import Webhook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTNERS = ["freshmart", "fuelco", "medipharm", "cinestar"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="clearhouse-crash-")
    certs, data, partners = (os.path.join(tmp, d) for d in ("certs", "data", "partners"))
    subprocess.run([os.path.join(ROOT, "ops", "certs"), certs], check=True, capture_output=True, timeout=60)
    shutil.copytree(os.path.join(ROOT, "partners"), partners)
    with open(os.path.join(partners, "coalition.toml"), "a") as f:
        f.write("notice_allow_private_networks = true\n")

    # A partner endpoint that answers late (1 s), so kills land during deliveries.
    log = os.path.join(tmp, "received.jsonl")
    open(log, "w").close()
    receiver = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "ops", "notice-receiver.py"), "--cert", os.path.join(certs, "server.crt"),
         "--key", os.path.join(certs, "server.key"), "--partners", partners, "--log", log],
        stdout=subprocess.PIPE, text=True)
    rport = int(receiver.stdout.readline().strip().rsplit(":", 1)[1])
    secrets = {}
    import re
    import tomllib
    for p in PARTNERS:
        path = os.path.join(partners, f"{p}.toml")
        with open(path, "rb") as f:
            secrets[p] = tomllib.load(f)["webhook_secrets"][0]
        with open(path) as f:
            text = f.read()
        text = re.sub(r'(?m)^notice_url = .*$', f'notice_url = "https://localhost:{rport}/late-1/{p}"', text)
        with open(path, "w") as f:
            f.write(text + f'notice_ca_file = "{os.path.join(certs, "ca.crt")}"\n')

    def ch(*a, timeout=300):
        return subprocess.run([args.bin, *a, "--data", data, "--partners", partners], capture_output=True, text=True, timeout=timeout)

    state = {"port": None}
    lock = threading.Lock()
    acked, unknown, refused = {}, set(), 0  # (partner, reference) -> True
    counter = [0]
    stop = threading.Event()

    def client(cid):
        nonlocal refused
        s = requests.Session()
        s.trust_env = False
        s.verify = os.path.join(certs, "ca.crt")
        r2 = random.Random(args.seed * 100 + cid)
        while not stop.is_set():
            port = state["port"]
            if port is None:
                time.sleep(0.02)
                continue
            with lock:
                counter[0] += 1
                n = counter[0]
            partner = PARTNERS[n % len(PARTNERS)]
            member = f"M{r2.randrange(200)}"
            if r2.random() < 0.75:
                body = {"type": "points.earned", "data": {"member": member, "points": r2.randrange(1, 500), "reference": f"C{n}"}}
            else:
                body = {"type": "points.redeemed", "data": {"member": member, "points": r2.randrange(1, 50), "reference": f"C{n}"}}
            raw = json.dumps(body)
            msg = f"msg_crash_{n}"
            now = datetime.datetime.now(tz=datetime.timezone.utc)
            headers = {"content-type": "application/json", "webhook-id": msg, "webhook-timestamp": str(int(now.timestamp())),
                       "webhook-signature": Webhook(secrets[partner]).sign(msg, now, raw)}
            try:
                r = s.post(f"https://localhost:{port}/v1/partners/{partner}/events", data=raw.encode(), headers=headers, timeout=5)
            except requests.RequestException:
                with lock:
                    unknown.add((partner, f"C{n}"))
                continue
            with lock:
                if 200 <= r.status_code < 300:
                    acked[(partner, f"C{n}")] = True
                elif r.status_code >= 500:
                    unknown.add((partner, f"C{n}"))  # 503 while stopping: not decided, at most once
                else:
                    refused += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()

    def start_serve():
        p = subprocess.Popen([args.bin, "serve", "--port", "0", "--certs", certs, "--data", data, "--partners", partners],
                             stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "serve.log"), "a"), text=True)
        line = p.stdout.readline()
        if "listening on https://" not in line:
            raise SystemExit(f"serve did not start: {line!r}")
        state["port"] = int(line.strip().rsplit(":", 1)[1])
        return p

    kills = recoveries = settle_kills = settles = 0
    deadline = time.time() + args.seconds
    serve = start_serve()
    while kills < args.kills and time.time() < deadline:
        time.sleep(rng.uniform(0.2, 1.2))
        if kills % 3 == 2:
            # A settlement run, killed at a random moment (perhaps before, during or after its commit).
            settle = subprocess.Popen([args.bin, "settle", "--data", data, "--partners", partners],
                                      stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "settle.log"), "a"))
            time.sleep(rng.uniform(0.0, 0.6))
            if settle.poll() is None:
                settle.send_signal(signal.SIGKILL)
                settle_kills += 1
            settle.wait(timeout=60)
            settles += 1
            time.sleep(rng.uniform(0.1, 1.5))  # serve's worker is now delivering (slowly) this run's notices
        state["port"] = None
        serve.send_signal(signal.SIGKILL)
        serve.wait(timeout=30)
        kills += 1
        serve = start_serve()
        recoveries += 1

    stop.set()
    for t in threads:
        t.join(timeout=10)
    # A last run, then let the worker deliver what is due (bounded), then stop cleanly.
    final = ch("settle")
    if final.returncode != 0:
        raise SystemExit("the final settle failed: " + final.stderr)
    time.sleep(1.0)
    deliver_deadline = time.time() + 60
    while time.time() < deliver_deadline:
        db = sqlite3.connect(f"file:{os.path.join(data, 'coalition.sqlite')}?mode=ro", uri=True)
        pending = db.execute("SELECT COUNT(*) FROM notice WHERE state = 'pending'").fetchone()[0]
        db.close()
        if pending == 0:
            break
        time.sleep(0.5)
    serve.send_signal(signal.SIGTERM)
    if serve.wait(timeout=60) != 0:
        raise SystemExit("serve did not stop cleanly")
    receiver.kill()

    breaches = []
    # 1. Acknowledged exactly once; unanswered at most once.
    seen = {}
    for p in PARTNERS:
        path = os.path.join(data, "ledgers", f"{p}.sqlite")
        if not os.path.exists(path):
            continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        for (ref,) in db.execute("SELECT reference FROM entry"):
            seen[(p, ref)] = seen.get((p, ref), 0) + 1
        db.close()
    for key in acked:
        if seen.get(key, 0) != 1:
            breaches.append(f"acknowledged {key} is in its ledger {seen.get(key, 0)} times")
    for key in unknown:
        if seen.get(key, 0) > 1:
            breaches.append(f"unanswered {key} is in its ledger {seen[key]} times")
    for key, n in seen.items():
        if key not in acked and key not in unknown:
            breaches.append(f"{key} is in a ledger but was refused")
    # 2. verify.
    v = ch("verify")
    if v.returncode != 0:
        breaches.append("verify failed:\n" + v.stdout + v.stderr)
    # 3. Runs recomputed here from the ledger files.
    db = sqlite3.connect(f"file:{os.path.join(data, 'coalition.sqlite')}?mode=ro", uri=True)
    runs = db.execute("SELECT number, id, first_journal_id, last_journal_id FROM run ORDER BY number").fetchall()
    stored = {(r, p): (i, d) for r, p, i, d in db.execute("SELECT run_number, partner, issued_points, redeemed_points FROM run_partner")}
    for p in PARTNERS:
        path = os.path.join(data, "ledgers", f"{p}.sqlite")
        if not os.path.exists(path):
            continue
        ledger = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        for number, rid, first, last in runs:
            rows = ledger.execute("SELECT kind, SUM(points) FROM entry WHERE journal_id BETWEEN ? AND ? GROUP BY kind", (first, last)).fetchall()
            k = dict(rows)
            issued, redeemed = k.get(1, 0) - k.get(3, 0), k.get(2, 0) - k.get(4, 0)
            got = stored.get((number, p), (0, 0))
            if rows and got != (issued, redeemed):
                breaches.append(f"run {rid}: {p} has {got}, its ledger says {(issued, redeemed)}")
        ledger.close()
    # 4. Notices: one per partner of every run, delivered or pending.
    missing = db.execute("""SELECT COUNT(*) FROM run_partner rp LEFT JOIN notice n
                            ON n.run_number = rp.run_number AND n.partner = rp.partner WHERE n.id IS NULL""").fetchone()[0]
    if missing:
        breaches.append(f"{missing} notices of committed runs are missing")
    states = dict(db.execute("SELECT state, COUNT(*) FROM notice GROUP BY state").fetchall())
    if states.get("dead", 0):
        breaches.append(f"{states['dead']} notices became dead letters")
    interrupted = db.execute("SELECT COUNT(*) FROM notice_attempt WHERE outcome = 'interrupted'").fetchone()[0]
    db.close()

    print(f"crash test (seed {args.seed}): {counter[0]} events sent, {len(acked)} acknowledged, {refused} refused, "
          f"{len(unknown)} without an answer ({sum(1 for k in unknown if seen.get(k))} of them in a ledger); "
          f"{kills} kills of serve and {recoveries} recoveries; {settles} settlements started, {settle_kills} killed while running; "
          f"{len(runs)} runs committed; notices {states.get('delivered', 0)} delivered, {states.get('pending', 0)} pending, "
          f"{states.get('dead', 0)} dead, {interrupted} attempts interrupted by a kill; breaches = {len(breaches)}")
    for b in breaches[:50]:
        print("BREACH", b)
    if os.environ.get("CRASH_TEST_KEEP"):
        print("data kept in", tmp)
    elif not breaches:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print("data left in", tmp)
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
