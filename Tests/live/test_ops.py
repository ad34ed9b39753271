"""The operator's scripts in ops/ as the runbook (docs/OPERATIONS.md) uses them."""
import os
import subprocess
import time

from liveserver import BIN, ROOT, LiveServer, earn


def post_cli(s, webhook_id, member, points, reference):
    """One earn at fuelco through `clearhouse post` (no server needed)."""
    r = subprocess.run([BIN, "post", "--partner", "fuelco", "--webhook-id", webhook_id, "--data", s.data, "--partners", s.partners],
                       input=earn(member, points, reference), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_ops_backup_twice_in_one_second_refuses_the_second():
    """Backups are named by the second: a second one in the same second used to land inside
    the first (`mv` into an existing directory) and still report success. It is refused, and
    the first stays whole and restorable."""
    s = LiveServer()
    try:
        post_cli(s, "ops-1", "OPS-1", 10, "OPS-R1")
        dest = os.path.join(s.tmp, "backups")
        # faketime reads its time in the local zone. `-f` without `@` stops the clock there (the
        # default starts it there: a first backup taking over a second named the second apart);
        # the monotonic clock runs, so that timeouts still pass.
        env = dict(os.environ, CLEARHOUSE_BIN=BIN, TZ="UTC", FAKETIME_DONT_FAKE_MONOTONIC="1")
        frozen = ["faketime", "-f", "2026-11-29 12:00:00", os.path.join(ROOT, "ops", "backup"), s.data, dest]
        first = subprocess.run(frozen, capture_output=True, text=True, timeout=120, env=env)
        assert first.returncode == 0, first.stderr
        second = subprocess.run(frozen, capture_output=True, text=True, timeout=120, env=env)
        assert second.returncode == 1 and "already exists" in second.stderr, (second.returncode, second.stderr)
        assert sorted(os.listdir(dest)) == ["20261129T120000Z"]
        backup = os.path.join(dest, "20261129T120000Z")
        assert sorted(os.listdir(backup)) == ["coalition.sqlite", "ledgers"], os.listdir(backup)
        restored = os.path.join(s.tmp, "restored")
        r = subprocess.run([BIN, "restore", backup, "--data", restored, "--partners", s.partners], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        s.close()


def test_restore_of_an_inconsistent_backup_restores_nothing():
    """A 'backup' whose ledgers are ahead of its journal (files of two backups mixed) cannot
    be opened: restore exits 1 naming the backup, and leaves nothing that looks like data
    (its files go back into restore.partial, which every verb refuses)."""
    s = LiveServer()
    try:
        post_cli(s, "mix-1", "MIX-1", 10, "MIX-R1")
        old, new = os.path.join(s.tmp, "old"), os.path.join(s.tmp, "new")
        s.ch("backup", old)
        post_cli(s, "mix-2", "MIX-1", 10, "MIX-R2")
        s.ch("backup", new)
        mixed = os.path.join(s.tmp, "mixed")
        os.makedirs(os.path.join(mixed, "ledgers"))
        subprocess.run(["cp", os.path.join(old, "coalition.sqlite"), mixed], check=True)
        subprocess.run(["cp", os.path.join(new, "ledgers", "fuelco.sqlite"), os.path.join(mixed, "ledgers")], check=True)
        target = os.path.join(s.tmp, "restored")
        r = subprocess.run([BIN, "restore", mixed, "--data", target, "--partners", s.partners], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "is not a consistent backup" in r.stderr and "Nothing was restored" in r.stderr, (r.returncode, r.stderr)
        assert os.listdir(target) == ["restore.partial"], os.listdir(target)
        v = subprocess.run([BIN, "verify", "--data", target, "--partners", s.partners], capture_output=True, text=True, timeout=120)
        assert v.returncode == 1 and "interrupted restore" in v.stdout, v.stdout
        runs = subprocess.run([BIN, "runs", "--data", target, "--partners", s.partners], capture_output=True, text=True, timeout=120)
        assert runs.returncode == 2 and "interrupted restore" in runs.stderr, runs.stderr
        # serve refuses it too, before writing anything there (a statement key, say).
        import shutil
        certs = os.path.join(s.tmp, "certs-without-key")
        shutil.copytree(s.certs, certs)
        if os.path.exists(os.path.join(certs, "statement.key")):
            os.remove(os.path.join(certs, "statement.key"))
        served = subprocess.run([BIN, "serve", "--port", "0", "--certs", certs, "--data", target, "--partners", s.partners],
                                capture_output=True, text=True, timeout=60)
        assert served.returncode == 2 and "interrupted restore" in served.stderr, (served.returncode, served.stderr)
        assert os.listdir(target) == ["restore.partial"], os.listdir(target)
    finally:
        s.close()


def test_runs_closed_after_a_restore_never_reuse_a_notified_run_id():
    """The partners hold notices of runs closed after the backup; the restored coalition
    numbers its next runs the same. Their ids (and so the notices' webhook-ids) carry the
    restore's time, so no partner drops a new notice as a duplicate of an old one."""
    import json
    import re
    s = LiveServer()
    try:
        post_cli(s, "rr-1", "RR-1", 10, "RR-R1")
        backup = os.path.join(s.tmp, "bk")
        s.ch("backup", backup)
        lost = json.loads(s.ch("settle", "--json").stdout)
        assert lost["run"] == "R000001"
        restored = os.path.join(s.tmp, "restored")
        r = subprocess.run([BIN, "restore", backup, "--data", restored, "--partners", s.partners], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        again = subprocess.run([BIN, "settle", "--json", "--data", restored, "--partners", s.partners], capture_output=True, text=True, timeout=120)
        run = json.loads(again.stdout)["run"]
        assert re.fullmatch(r"R\d{12}00001", run), run
        notices = subprocess.run([BIN, "notices", "list", "--data", restored, "--partners", s.partners], capture_output=True, text=True, timeout=120)
        assert f"{run}:fuelco" in notices.stdout and "R000001:fuelco" not in notices.stdout, notices.stdout
        # Its statement is served under that id.
        statement = subprocess.run([BIN, "statement", "fuelco", run, "--data", restored, "--partners", s.partners],
                                   capture_output=True, text=True, timeout=120)
        assert statement.returncode == 0 and "RR-R1" in statement.stdout, statement.stderr
    finally:
        s.close()


def test_export_refuses_books_of_several_currencies():
    """Runs closed before the currency was recorded may be in another currency (their notices
    say which): the books are not written in today's currency over them."""
    s = LiveServer()
    try:
        post_cli(s, "cur-1", "CUR-1", 10, "CUR-R1")
        s.ch("settle")
        post_cli(s, "cur-2", "CUR-1", 10, "CUR-R2")
        s.ch("settle")
        assert s.ch("export").returncode == 0
        # As a history settled first in USD, then in EUR, under a version that let the currency change.
        db = os.path.join(s.data, "coalition.sqlite")
        subprocess.run(["sqlite3", db, "DROP TRIGGER run_immutable_u; UPDATE run SET currency = 'USD' WHERE number = 1; "
                        "CREATE TRIGGER run_immutable_u BEFORE UPDATE ON run BEGIN SELECT RAISE(ABORT, 'a closed run never changes'); END;"],
                       check=True, capture_output=True, timeout=60)
        r = s.ch("export", check=False)
        assert r.returncode == 1 and "several currencies (EUR, USD)" in r.stderr, (r.returncode, r.stderr)
    finally:
        s.close()


def test_the_nightly_settle_unit_closes_the_previous_utc_day_exactly():
    """ops/systemd/clearhouse-settle.service, fired by its timer at 00:05 UTC, settles through
    the last millisecond of the day before: an entry of 23:59:59 is in the run, one of 00:01
    of the new day is not (with no --through it would be, the cutoff being "now")."""
    import re
    import shlex
    s = LiveServer()
    # faketime reads its times in the local zone. `-f` stops the clock at the instant given:
    # started there, a slow start-up (a debug build opening a new data directory on a busy
    # machine) accepted the 23:59:59 entry after midnight. The monotonic clock runs.
    utc = dict(os.environ, TZ="UTC", FAKETIME_DONT_FAKE_MONOTONIC="1")
    try:
        def post_at(when, webhook_id, reference):
            r = subprocess.run(["faketime", "-f", when, BIN, "post", "--partner", "fuelco", "--webhook-id", webhook_id,
                                "--data", s.data, "--partners", s.partners],
                               input=earn("NIGHT-1", 10, reference), capture_output=True, text=True, timeout=60, env=utc)
            assert r.returncode == 0, r.stderr
        post_at("2026-11-29 23:59:59", "night-1", "NIGHT-R1")
        post_at("2026-11-30 00:01:00", "night-2", "NIGHT-R2")
        unit = open(os.path.join(ROOT, "ops", "systemd", "clearhouse-settle.service")).read()
        line = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
        command = (line.removeprefix("ExecStart=").replace("%%", "%").replace("/usr/local/bin/clearhouse", BIN)
                   .replace("/var/lib/clearhouse/data", s.data).replace("/etc/clearhouse/partners", s.partners))
        r = subprocess.run(["faketime", "-f", "2026-11-30 00:05:07", *shlex.split(command)], capture_output=True, text=True, timeout=120, env=utc)
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"cutoff 2026-11-29T23:59:59\.999Z, 1 entry ", r.stdout), r.stdout
    finally:
        s.close()


def test_ops_backup_keeps_the_newest_and_prunes_only_its_own_backups():
    """KEEP newest backups stay; older ones go, and nothing else: a destination whose name
    holds a space used to be split, and a sibling directory named by its first word removed."""
    s = LiveServer()
    try:
        post_cli(s, "keep-1", "KEEP-1", 10, "KEEP-R1")
        dest = os.path.join(s.tmp, "back ups")
        sibling = os.path.join(s.tmp, "back")
        os.makedirs(sibling)
        # Stopped at each second (`-f`): started there, a backup taking over a second was
        # named by the next one.
        env = dict(os.environ, CLEARHOUSE_BIN=BIN, TZ="UTC", KEEP="2", FAKETIME_DONT_FAKE_MONOTONIC="1")
        for second in ("00", "01", "02"):
            r = subprocess.run(["faketime", "-f", f"2026-11-29 12:00:{second}", os.path.join(ROOT, "ops", "backup"), s.data, dest],
                               capture_output=True, text=True, timeout=120, env=env, cwd=s.tmp)
            assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(dest)) == ["20261129T120001Z", "20261129T120002Z"], os.listdir(dest)
        assert os.path.isdir(sibling), "a directory that is no backup is never pruned"
    finally:
        s.close()


def test_a_verb_whose_standard_output_cannot_be_written_exits_1():
    """`> /dev/full` (a full disk): the verb says so and exits 1, never 0 with its output lost,
    never a crash; what it did stays done (settle's run is closed). (A closed pipe ends a verb
    by SIGPIPE, as it does `cat`.)"""
    s = LiveServer()
    try:
        post_cli(s, "full-1", "FULL-1", 10, "FULL-R1")
        common = ["--data", s.data, "--partners", s.partners]
        with open("/dev/full", "w") as full:
            def run(*args):
                return subprocess.run([BIN, *args, *common], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
            settled = run("settle", "--json")
            assert settled.returncode == 1 and "standard output" in settled.stderr, (settled.returncode, settled.stderr)
            run_id = s.ch("runs").stdout.split("\n")[1].split()[0]
            assert run_id.startswith("R"), "the run was closed all the same"
            for verb in (["statement", "fuelco", run_id], ["statement", "fuelco", run_id, "--format", "json"], ["export"], ["runs"], ["notices", "list"],
                         ["simulate", "--emit", "--events", "20000"]):
                r = run(*verb)
                assert r.returncode == 1 and "standard output" in r.stderr and "Fatal error" not in r.stderr, (verb, r.returncode, r.stderr[:300])
    finally:
        s.close()


def test_a_post_that_died_beside_serve_is_copied_into_its_ledger_by_serve():
    """`clearhouse post` beside a running `serve` dies between its journal commit and its
    ledger commit (`CLEARHOUSE_CRASH_AT`): `verify` reports the ledger behind; `serve`, idle,
    copies the entry within its idle interval (5 s), says so in its log, and `verify` passes
    with no other posting made."""
    s = LiveServer().start()
    try:
        assert s.post("fuelco", earn("IDLE-1", 5, "IDLE-R0")).status_code == 201
        env = dict(os.environ, CLEARHOUSE_CRASH_AT="after-journal-commit")
        r = subprocess.run([BIN, "post", "--partner", "fuelco", "--webhook-id", "idle-1", "--data", s.data, "--partners", s.partners],
                           input=earn("IDLE-1", 7, "IDLE-R1"), capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode != 0, (r.returncode, r.stdout, r.stderr)
        deadline = time.monotonic() + 20
        while s.ch("verify", check=False).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        v = s.ch("verify", check=False)
        assert v.returncode == 0, v.stdout + v.stderr
        assert "ledger caught up from the journal" in s.read_log()
        # The copied entry is the one `post` decided: its replay answers it.
        replay = subprocess.run([BIN, "post", "--partner", "fuelco", "--webhook-id", "idle-1", "--data", s.data, "--partners", s.partners],
                                input=earn("IDLE-1", 7, "IDLE-R1"), capture_output=True, text=True, timeout=60)
        assert replay.returncode == 0 and '"sequence":2' in replay.stdout, replay.stdout + replay.stderr
        assert s.stop() == 0
    finally:
        s.close()
