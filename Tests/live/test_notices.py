"""Live suite for settlement notices (CONTRACT §7): the real binary sends them with libcurl to
ops/notice-receiver.py over real TLS on loopback; the receiver verifies each one with the
official `standardwebhooks` package. Bounded: every wait has a deadline.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("CLEARHOUSE_BIN", os.path.join(ROOT, ".build", "debug", "clearhouse"))
PARTNERS = ["freshmart", "fuelco", "medipharm", "cinestar"]


def wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


class Env:
    """A data directory, development certificates, a partner receiver, and partner files whose
    notice_url points at it (one behaviour per partner)."""

    def __init__(self, modes):
        self.tmp = tempfile.mkdtemp(prefix="clearhouse-notices-")
        self.certs = os.path.join(self.tmp, "certs")
        subprocess.run([os.path.join(ROOT, "ops", "certs"), self.certs], check=True, capture_output=True, timeout=60)
        self.partners = os.path.join(self.tmp, "partners")
        shutil.copytree(os.path.join(ROOT, "partners"), self.partners)
        with open(os.path.join(self.partners, "coalition.toml"), "a") as f:
            f.write("notice_allow_private_networks = true\n")  # the receiver is on loopback
        self.data = os.path.join(self.tmp, "data")
        self.log = os.path.join(self.tmp, "received.jsonl")
        open(self.log, "w").close()
        self.receiver = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "ops", "notice-receiver.py"), "--cert", os.path.join(self.certs, "server.crt"),
             "--key", os.path.join(self.certs, "server.key"), "--partners", self.partners, "--log", self.log],
            stdout=subprocess.PIPE, text=True)
        line = self.receiver.stdout.readline()
        assert "listening on https://" in line, line
        self.port = int(line.strip().rsplit(":", 1)[1])
        for p in PARTNERS:
            self.point(p, modes.get(p, "ok"))

    def point(self, partner, mode):
        path = os.path.join(self.partners, f"{partner}.toml")
        with open(path) as f:
            text = f.read()
        text = re.sub(r'(?m)^notice_url = .*$', f'notice_url = "https://localhost:{self.port}/{mode}/{partner}"', text)
        text = re.sub(r'(?m)^notice_ca_file = .*\n', "", text)
        text += f'notice_ca_file = "{os.path.join(self.certs, "ca.crt")}"\n'
        with open(path, "w") as f:
            f.write(text)

    def ch(self, *args, stdin="", timeout=120, check=True, faketime=None):
        # faketime: "+Ns" runs the verb with the wall clock N s ahead (libfaketime).
        cmd = [BIN, *args, "--data", self.data, "--partners", self.partners]
        if faketime:
            cmd = ["faketime", "-f", faketime] + cmd
        r = subprocess.run(cmd, input=stdin, text=True, capture_output=True, timeout=timeout)
        if check:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def earn(self, partner, member, points, ref):
        body = json.dumps({"type": "points.earned", "data": {"member": member, "points": points, "reference": ref}})
        self.ch("post", "--partner", partner, stdin=body)

    def received(self, webhook_id=None):
        with open(self.log) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r for r in rows if webhook_id is None or r["webhook_id"] == webhook_id]

    def close(self):
        self.receiver.kill()
        self.receiver.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def env_factory():
    made = []

    def make(modes=None):
        e = Env(modes or {})
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def kill_sender_after_first_arrival(env_factory, mode):
    """fuelco's endpoint in `mode`, a run with one fuelco entry, and `notices send` killed with
    SIGKILL as soon as its first attempt reaches the endpoint."""
    env = env_factory({"fuelco": mode})
    env.earn("fuelco", "KILL-1", 300, "KILL-R1")
    env.ch("settle")
    sender = subprocess.Popen([BIN, "notices", "send", "--data", env.data, "--partners", env.partners],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: env.received("R000001:fuelco"), 30, "the first attempt to arrive")
    sender.send_signal(signal.SIGKILL)
    sender.wait(timeout=10)
    return env


def test_killed_in_the_middle_of_a_delivery_the_notice_still_arrives_once(env_factory):
    # The receiver holds the request; Clearhouse dies before it gets an answer.
    env = kill_sender_after_first_arrival(env_factory, "hang-once")
    # Restarted, it sends again at once: the dead sender's lease is void.
    out = env.ch("notices", "send").stdout
    assert "1 delivered" in out, out
    got = env.received("R000001:fuelco")
    assert len(got) == 2, got
    assert all(r["verified"] for r in got), "standardwebhooks verified both attempts"
    assert got[0].get("held") and got[1]["status"] == 200
    assert got[0]["body"] == got[1]["body"], "the same notice both times"
    delivered = {r["webhook_id"] for r in got if r.get("status") == 200}
    assert delivered == {"R000001:fuelco"}, "deduplicating by webhook-id: exactly once"
    shown = env.ch("notices", "show", "R000001:fuelco").stdout
    assert "interrupted" in shown and "delivered" in shown, shown
    env.ch("verify")


def test_notices_send_stopped_by_sigterm_records_an_interrupted_attempt_that_does_not_count(env_factory):
    """SIGTERM (or Ctrl-C) stops `notices send` as a stop, not a crash: the transfer in flight
    is cut short, recorded as interrupted and given back to the round; the next send delivers."""
    env = env_factory({"fuelco": "hang-once"})
    env.earn("fuelco", "TERM-1", 300, "TERM-R1")
    env.ch("settle")
    sender = subprocess.Popen([BIN, "notices", "send", "--data", env.data, "--partners", env.partners],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: env.received("R000001:fuelco"), 30, "the first attempt to arrive")
    sender.send_signal(signal.SIGTERM)
    out, err = sender.communicate(timeout=30)
    assert sender.returncode == 1 and "stopped by a signal" in err, (sender.returncode, out, err)
    shown = env.ch("notices", "show", "R000001:fuelco").stdout
    assert re.search(r"attempts +1 \(0 in this round", shown) and "interrupted" in shown, shown
    out = env.ch("notices", "send").stdout
    assert "1 delivered" in out, out
    shown = env.ch("notices", "show", "R000001:fuelco").stdout
    assert re.search(r"attempts +2 \(1 in this round", shown), shown


def test_killed_after_the_partner_stored_it_the_resent_notice_is_a_duplicate_by_id(env_factory):
    # The partner has stored the notice but not answered yet when Clearhouse dies.
    env = kill_sender_after_first_arrival(env_factory, "late-20")
    env.point("fuelco", "ok")  # the partner answers promptly from now on
    assert "1 delivered" in env.ch("notices", "send").stdout
    got = env.received("R000001:fuelco")
    assert [r["status"] for r in got] == [200, 200] and all(r["verified"] for r in got)
    assert [r["duplicate"] for r in got] == [False, True], "the partner sees it twice and knows it by its webhook-id"
    assert got[0]["body"] == got[1]["body"]
    assert len({r["webhook_id"] for r in got}) == 1, "exactly once after deduplication"


def test_serve_delivers_and_retries_notices_of_a_run_settled_while_it_runs(env_factory):
    env = env_factory({"cinestar": "fail-1"})
    env.earn("freshmart", "SERVE-1", 1000, "SERVE-R1")
    env.earn("cinestar", "SERVE-2", 500, "SERVE-R2")
    serve_log = os.path.join(env.tmp, "serve.log")
    serve = subprocess.Popen(
        [BIN, "serve", "--port", "0", "--certs", env.certs, "--data", env.data, "--partners", env.partners],
        stdout=subprocess.PIPE, stderr=open(serve_log, "w"), text=True)
    try:
        line = serve.stdout.readline()
        assert "listening on https://" in line, line
        port = int(line.strip().rsplit(":", 1)[1])
        env.ch("settle")
        # freshmart's arrives at once; cinestar's fails once (500) and the worker retries it
        # about 5 s later, as the schedule says.
        wait_for(lambda: any(r.get("status") == 200 for r in env.received("R000001:cinestar")), 30, "cinestar's retry")
        wait_for(lambda: any(r.get("status") == 200 for r in env.received("R000001:freshmart")), 30, "freshmart's notice")
        cinestar = env.received("R000001:cinestar")
        assert [r["status"] for r in cinestar] == [500, 200] and all(r["verified"] for r in cinestar)
        assert cinestar[1]["time"] - cinestar[0]["time"] >= 4.0, "back-off before the retry"
        s = requests.Session()
        s.trust_env = False
        metrics = wait_for(lambda: (lambda t: t if 'clearhouse_notices{state="delivered"} 2' in t else None)(
            s.get(f"https://localhost:{port}/metrics", verify=os.path.join(env.certs, "ca.crt"), timeout=10).text),
            10, "the delivered gauge")
        assert 'clearhouse_notice_attempts_total{outcome="retry"} 1' in metrics
        assert 'clearhouse_notice_attempts_total{outcome="delivered"} 2' in metrics
        assert "clearhouse_notice_attempt_duration_seconds_bucket" in metrics
        listed = env.ch("notices", "list", "--state", "delivered").stdout
        assert "R000001:cinestar" in listed and "R000001:freshmart" in listed
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
    with open(serve_log) as f:
        log = f.read()
    assert "notice delivered" in log
    for secret in ("whsec_", "v1,"):
        assert secret not in log, f"the server log contains {secret!r}"


def test_dead_letters_are_listed_and_sent_again_by_the_operator(env_factory):
    env = env_factory({"medipharm": "gone"})
    env.earn("medipharm", "DEAD-1", 40, "DEAD-R1")
    env.ch("settle")
    # A partner answering 410 Gone fails every attempt, each retried on the schedule (CONTRACT
    # §7), until the tenth makes a dead letter. The clock is moved past each next attempt
    # (5 s, 5 min, ... 24 h, jitter ±10 % included) with faketime: about three and a half days.
    delays = [5, 300, 1_800, 7_200, 18_000, 36_000, 50_400, 72_000, 86_400]
    ahead = 0
    for attempt in range(1, 11):
        out = env.ch("notices", "send", faketime=f"+{ahead}s").stdout
        assert f"{1 if attempt == 10 else 0} dead letters now" in out and "1 attempted" in out, (attempt, out)
        if attempt < 10:
            ahead += int(delays[attempt - 1] * 1.1) + 30
    assert "1 dead letters now" in out, out
    dead = env.ch("notices", "list", "--state", "dead").stdout
    assert "R000001:medipharm" in dead and "no success after 10 attempts" in dead, dead
    assert "R000001:medipharm" not in env.ch("notices", "list", "--state", "pending").stdout
    bad = env.ch("notices", "list", "--state", "lost", check=False)
    assert bad.returncode == 1 and "--state" in bad.stderr
    # The partner fixes its endpoint; the operator sends the dead letter again.
    # A retry before the fix fails again: exit 1, so that `retry && ...` means delivered. The
    # notice is pending again, on a new round of the schedule (no longer a dead letter).
    failed = env.ch("notices", "retry", "R000001:medipharm", check=False)
    assert failed.returncode == 1 and "410" in failed.stdout and "pending" in failed.stdout, (failed.returncode, failed.stdout, failed.stderr)
    assert "R000001:medipharm" in env.ch("notices", "list", "--state", "pending").stdout
    not_dead = env.ch("notices", "retry", "R000001:medipharm", check=False)
    assert not_dead.returncode == 1 and "only a dead letter" in not_dead.stderr, not_dead.stderr
    # The partner fixes its endpoint; the round's next attempt (5 s on; the clock moved 30 s
    # with faketime) delivers it.
    env.point("medipharm", "ok")
    sent = env.ch("notices", "send", faketime="+30s").stdout
    assert "1 delivered" in sent, sent
    got = env.received("R000001:medipharm")
    statuses = [r["status"] for r in got]
    # Ten failed attempts (410; or 401 where the receiver refused a timestamp faked days off its
    # clock), the operator's retry before the fix (410), and after it (200).
    assert len(statuses) == 12 and statuses[0] == 410 and set(statuses[:10]) <= {410, 401}, statuses
    assert statuses[10:] == [410, 200], statuses
    # The same webhook-id on every attempt; the attempts made on the real clock verify.
    assert {r["webhook_id"] for r in got} == {"R000001:medipharm"}
    assert got[0]["verified"] and got[-1]["verified"] and got[-2]["verified"]
    again = env.ch("notices", "retry", "R000001:medipharm", check=False)
    assert again.returncode == 1 and "only a dead letter" in again.stderr
    missing = env.ch("notices", "show", "R000009:nobody", check=False)
    assert missing.returncode == 1 and "no notice" in missing.stderr


def test_a_notice_url_that_is_not_https_is_refused_at_start_up(env_factory):
    env = env_factory()
    path = os.path.join(env.partners, "fuelco.toml")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(re.sub(r'(?m)^notice_url = .*$', 'notice_url = "http://localhost:1/x"', text))
    r = env.ch("partners", "check", check=False)
    assert r.returncode == 2 and "notice_url" in r.stderr and "fuelco.toml" in r.stderr


def test_notices_send_with_the_wrong_partners_spends_no_attempt(env_factory):
    """A --partners without any partner that has a pending notice (a typo at night) is refused
    before any attempt is recorded; one without some of them sends the others and names those
    it cannot; a retry for a partner without terms spends no new round."""
    env = env_factory()
    env.earn("fuelco", "WRONG-1", 40, "WRONG-R1")
    env.earn("cinestar", "WRONG-2", 40, "WRONG-R2")
    env.ch("settle")
    only = os.path.join(env.tmp, "only-coalition")
    os.makedirs(only)
    shutil.copy(os.path.join(env.partners, "coalition.toml"), only)
    r = subprocess.run([BIN, "notices", "send", "--data", env.data, "--partners", only], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no partner with a notice (cinestar, fuelco)" in r.stderr, r.stderr
    assert "nothing was attempted" in r.stderr
    listed = env.ch("notices", "list", "--state", "pending").stdout
    assert all(line.split()[2] == "0" for line in listed.splitlines()[1:]), listed
    # Without cinestar's file only: fuelco's notice goes, cinestar's is named.
    some = os.path.join(env.tmp, "some")
    shutil.copytree(env.partners, some)
    os.remove(os.path.join(some, "cinestar.toml"))
    r = subprocess.run([BIN, "notices", "send", "--data", env.data, "--partners", some], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "warning: cinestar not in" in r.stderr, (r.stdout, r.stderr)
    assert [x["status"] for x in env.received("R000001:fuelco")] == [200]
    assert env.received("R000001:cinestar") == []
    r = subprocess.run([BIN, "notices", "retry", "R000001:cinestar", "--data", env.data, "--partners", some], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "partner cinestar is not in" in r.stderr and "nothing was attempted" in r.stderr, r.stderr
    # A partner that left, alone with pending notices, while others had notices: its notice
    # is tried (and fails, towards a dead letter), never refused for good.
    r = subprocess.run([BIN, "notices", "send", "--data", env.data, "--partners", some], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "warning: cinestar not in" in r.stderr, (r.stdout, r.stderr)
