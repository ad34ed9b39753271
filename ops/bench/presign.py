#!/usr/bin/env python3
"""Writes N pre-signed Standard Webhooks event requests, one per line:
partner<TAB>webhook-id<TAB>timestamp<TAB>signature<TAB>body. Earns across many members and
all partners, each with a unique webhook id and reference. Usage: presign.py PARTNERS_DIR N OUT"""
import base64
import glob
import hashlib
import hmac
import json
import os
import sys
import time
import tomllib

partners_dir, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
secrets = {}
for path in sorted(glob.glob(os.path.join(partners_dir, "*.toml"))):
    if os.path.basename(path) != "coalition.toml":
        with open(path, "rb") as f:
            t = tomllib.load(f)
        secrets[t["id"]] = base64.b64decode(t["webhook_secrets"][0].removeprefix("whsec_"))
ids = sorted(secrets)
ts = str(int(time.time()))
run = hashlib.sha256(ts.encode()).hexdigest()[:8]
with open(out, "w") as f:
    for i in range(n):
        p = ids[i % len(ids)]
        body = json.dumps({"type": "points.earned", "data": {"member": f"B{i % 50000}", "points": 10 + i % 90,
                                                            "reference": f"BENCH-{run}-{i}"}}, separators=(",", ":"))
        mid = f"msg_{run}_{i}"
        sig = base64.b64encode(hmac.new(secrets[p], f"{mid}.{ts}.{body}".encode(), hashlib.sha256).digest()).decode()
        f.write(f"{p}\t{mid}\t{ts}\tv1,{sig}\t{body}\n")
