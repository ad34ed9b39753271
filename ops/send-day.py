#!/usr/bin/env python3
"""Simulated partner systems: each partner sends its share of a generated day (JSON lines from
`clearhouse simulate --emit`) as Standard Webhooks over HTTPS, in order, over its own keep-alive
connection, all partners at once. A few extra postings are deliberately bad (a wrong signature,
a stale timestamp, an unknown partner). Prints what was accepted and refused.

Usage: send-day.py --url https://127.0.0.1:PORT --ca CA.crt --partners DIR DAY.jsonl
Uses the official `standardwebhooks` package for signing (ops/setup installs it into .venv).
"""
import argparse
import collections
import datetime
import glob
import json
import os
import threading
import tomllib

import requests
from standardwebhooks.webhooks import Webhook


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--partners", required=True)
    ap.add_argument("day")
    a = ap.parse_args()

    secrets = {}
    for path in glob.glob(os.path.join(a.partners, "*.toml")):
        if os.path.basename(path) == "coalition.toml":
            continue
        with open(path, "rb") as f:
            t = tomllib.load(f)
        secrets[t["id"]] = t["webhook_secrets"][0]

    by_partner = collections.defaultdict(list)
    with open(a.day) as f:
        for line in f:
            p = json.loads(line)
            by_partner[p["partner"]].append(p)

    tally = collections.Counter()
    intents = collections.defaultdict(collections.Counter)
    lock = threading.Lock()

    def send(session, partner, msg_id, body, secret, when=None):
        when = when or datetime.datetime.now(tz=datetime.timezone.utc)
        sig = Webhook(secret).sign(msg_id, when, body)
        r = session.post(f"{a.url}/v1/partners/{partner}/events", data=body.encode(), timeout=30, headers={
            "content-type": "application/json", "webhook-id": msg_id,
            "webhook-timestamp": str(int(when.timestamp())), "webhook-signature": sig})
        if r.status_code in (200, 201):
            return str(r.status_code)
        return f"{r.status_code} {r.json()['type'].rsplit(':', 1)[1]}"

    def partner_system(partner, postings):
        s = requests.Session()
        s.trust_env = False
        s.verify = a.ca
        for p in postings:
            outcome = send(s, partner, p["webhook_id"], p["body"], secrets[partner])
            with lock:
                tally[(partner, outcome)] += 1
                if p["intent"]:
                    intents[p["intent"]][outcome] += 1
        # Deliberately bad: a forged signature, a stale timestamp, an unknown partner.
        body = postings[0]["body"] if postings else "{}"
        other = next(v for k, v in secrets.items() if k != partner)
        stale = datetime.datetime.now(tz=datetime.timezone.utc) - datetime.timedelta(minutes=10)
        bad = [("signed with another partner's secret", send(s, partner, f"forged_{partner}", body, other)),
               ("timestamp 10 minutes old", send(s, partner, f"stale_{partner}", body, secrets[partner], when=stale)),
               ("unknown partner", send(s, f"{partner}-x", f"unknown_{partner}", body, secrets[partner]))]
        with lock:
            for intent, outcome in bad:
                intents[intent][outcome] += 1

    threads = [threading.Thread(target=partner_system, args=(k, v)) for k, v in sorted(by_partner.items())]
    start = datetime.datetime.now()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = (datetime.datetime.now() - start).total_seconds()

    print(f"{'partner':<12} {'201 new':>8} {'200 replay':>11}  refused")
    for partner in sorted(by_partner):
        row = {o: n for (p, o), n in tally.items() if p == partner}
        refused = ", ".join(f"{n} × {o}" for o, n in sorted(row.items()) if not o.startswith("20"))
        print(f"{partner:<12} {row.get('201', 0):>8} {row.get('200', 0):>11}  {refused}")
    total = sum(tally.values())
    print(f"\n{total} signed HTTPS postings from {len(by_partner)} partner systems at once in {seconds:.1f} s ({total / seconds:.0f}/s)")
    print("\nDeliberately bad postings and what they got:")
    for intent in sorted(intents):
        print(f"  {intent}: " + ", ".join(f"{n} × {o}" for o, n in sorted(intents[intent].items())))


if __name__ == "__main__":
    main()
