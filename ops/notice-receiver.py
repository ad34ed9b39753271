#!/usr/bin/env python3
"""A partner's settlement-notice endpoint, for the demo and the tests (never for production).

HTTPS on loopback (Python's ssl), every notice verified with the official `standardwebhooks`
package against the partner's `notice_secret` read from partners/<id>.toml, deduplicated by
`webhook-id`, and logged as one JSON line per request. The first path segment picks a
behaviour, so one receiver can play every kind of partner:

  /ok/<p>            200
  /fail-N/<p>        500 for the first N requests of each webhook-id, then 200
  /busy-S/<p>        503 with retry-after: S for the first request of each webhook-id, then 200
  /stall/<p>         answers after --stall-seconds
  /hang-once/<p>     holds the first request of each webhook-id until the client goes away, then 200
  /redirect/<p>      302 to /ok/<p> (must not be followed)
  /gone/<p>          410
  /big/<p>           200 with a 1 MiB body
  /big-500/<p>       500 with a 1 MiB body
  /late-S/<p>        stores the notice (logged as a 200) at once, then answers 200 after S seconds

Usage: notice-receiver.py --cert C --key K --partners DIR --log FILE [--port 0] [--client-ca CA]
Prints "listening on https://127.0.0.1:PORT" when ready; stops on SIGTERM or SIGINT.
"""
import argparse
import datetime
import http.server
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
import tomllib

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def load_secrets(directory):
    secrets = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".toml") or name == "coalition.toml":
            continue
        with open(os.path.join(directory, name), "rb") as f:
            terms = tomllib.load(f)
        secret = terms.get("notice_secret", "")
        if secret.startswith("env:"):
            secret = os.environ.get(secret[4:], "")
        elif secret.startswith("file:"):
            with open(os.path.join(directory, secret[5:])) as s:
                secret = s.read().strip()
        secrets[terms["id"]] = secret
    return secrets


class State:
    def __init__(self, secrets, log_path, stall_seconds, any_time):
        self.secrets = secrets
        self.log_path = log_path
        self.stall_seconds = stall_seconds
        self.any_time = any_time
        self.lock = threading.Lock()
        self.seen = {}  # webhook-id -> requests so far
        self.delivered = set()

    def count(self, webhook_id):
        with self.lock:
            self.seen[webhook_id] = self.seen.get(webhook_id, 0) + 1
            return self.seen[webhook_id]

    def log(self, record):
        with self.lock:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def verify(state, partner, body, headers):
    """Checks the signature with the standardwebhooks package; with --any-time (tests on a
    manual clock) a timestamp outside its 5-minute window is still checked by re-signing
    with the same package."""
    secret = state.secrets.get(partner)
    if not secret:
        return False, f"no notice_secret for partner {partner!r}"
    wh = Webhook(secret)
    try:
        wh.verify(body, headers)
        return True, ""
    except WebhookVerificationError as e:
        if not state.any_time:
            return False, str(e)
    try:
        ts = datetime.datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=datetime.timezone.utc)
        expected = wh.sign(headers["webhook-id"], ts, body.decode("utf-8")).split(" ")
        given = headers.get("webhook-signature", "").split(" ")
        return (any(s in given for s in expected), "signature does not match")
    except Exception as e:  # noqa: BLE001 - any failure means not verified
        return False, str(e)


def handler_for(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, extra=None, body=b'{"ok":true}'):
            self.send_response(status)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length) if length else b""
            parts = [p for p in self.path.split("/") if p]
            mode, partner = (parts[0], parts[-1]) if len(parts) >= 2 else ("ok", parts[-1] if parts else "")
            headers = {k.lower(): v for k, v in self.headers.items()}
            webhook_id = headers.get("webhook-id", "")
            n = state.count(webhook_id)
            ok, why = verify(state, partner, body, headers)
            record = {"path": self.path, "partner": partner, "webhook_id": webhook_id, "n": n, "verified": ok,
                      "http_version": self.request_version, "time": time.time()}
            try:
                record["body"] = json.loads(body)
            except ValueError:
                record["body"] = None
            if not ok:
                record.update(status=401, why=why)
                state.log(record)
                return self.reply(401, body=json.dumps({"error": why}).encode())
            status, extra, reply_body = 200, {}, b'{"ok":true}'
            if mode.startswith("fail-") and n <= int(mode[5:]):
                status = 500
            elif mode.startswith("busy-") and n == 1:
                status, extra = 503, {"Retry-After": mode[5:]}
            elif mode == "stall":
                time.sleep(state.stall_seconds)
            elif mode == "hang-once" and n == 1:
                record.update(status=None, held=True)
                state.log(record)
                self.hold()
                return
            elif mode == "redirect":
                status, extra = 302, {"Location": f"/ok/{partner}"}
            elif mode == "gone":
                status = 410
            elif mode == "big":
                reply_body = b"x" * (1 << 20)
            elif mode == "big-500":
                status, reply_body = 500, b"x" * (1 << 20)
            elif mode.startswith("late-"):
                with state.lock:
                    record["duplicate"] = webhook_id in state.delivered
                    state.delivered.add(webhook_id)
                record["status"] = 200
                state.log(record)
                time.sleep(float(mode[5:]))
                return self.reply(200)
            if 200 <= status < 300:
                with state.lock:
                    record["duplicate"] = webhook_id in state.delivered
                    state.delivered.add(webhook_id)
            record["status"] = status
            state.log(record)
            self.reply(status, extra, reply_body)

        def hold(self):
            """Never answers; waits (bounded) until the client closes the connection."""
            self.connection.settimeout(0.2)
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if self.connection.recv(1) == b"":
                        break
                except (socket.timeout, ssl.SSLWantReadError):
                    continue
                except OSError:
                    break
            self.close_connection = True

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--client-ca", help="require a client certificate signed by this CA")
    ap.add_argument("--partners", required=True, help="directory of partner TOML files (notice secrets)")
    ap.add_argument("--log", required=True, help="JSON lines, one per request")
    ap.add_argument("--stall-seconds", type=float, default=10.0)
    ap.add_argument("--any-time", action="store_true", help="accept signatures made on a manual clock")
    args = ap.parse_args()
    # A parent may have started us with signals blocked (threads of Swift's Foundation do).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    state = State(load_secrets(args.partners), args.log, args.stall_seconds, args.any_time)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    if args.client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(args.client_ca)
    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            # A client that goes away mid-request (a killed sender) is expected here: one line.
            print(f"notice-receiver: connection from {client_address[0]}:{client_address[1]} ended: {sys.exc_info()[1]!r}",
                  file=sys.stderr)

    server = Server((args.host, args.port), handler_for(state))
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    # Never outlive whoever started us (a test run that was killed, a demo interrupted): once
    # the parent is gone (we are re-parented), stop.
    parent = os.getppid()

    def watch_parent():
        while True:
            time.sleep(1)
            if os.getppid() != parent:
                os._exit(0)
    threading.Thread(target=watch_parent, daemon=True).start()
    print(f"listening on https://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
