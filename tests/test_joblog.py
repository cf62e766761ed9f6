"""Job logs without a broker: the file of each attempt, the cap that keeps
head and tail, a full disk that loses output but never the job, retention, and the settings."""

import errno
import json
import os
import time
from pathlib import Path

import pytest

from rbit import config as config_module
from rbit import joblog, logdir
from rbit.errors import ConfigError
from rbit.joblog import JobLog
from rbit.settings import parse_size

from .harness import ROOT, write_config


def numbered(count, start=1):
    return b"".join(b"line %07d\n" % n for n in range(start, start + count))


def read_all(log, offset=0, limit=1000):
    """Everything a reader following *log* from *offset* gets, in reads of *limit* bytes."""
    out = b""
    while True:
        data, offset = log.read(offset, limit)
        if not data:
            return out, offset
        out += data


def test_each_attempt_has_a_file_and_the_newest_is_the_jobs_log(tmp_path):
    """A log file per job and attempt: LOG_DIR/JOB/ATTEMPT.log, numbered from 1; the newest is
    the job's log; ATTEMPT.json says who ran it and how it ended."""
    first = JobLog.open(tmp_path, 42, 1 << 20, {"worker": "w1"})
    first.write(b"first attempt\n")
    first.close("rbit: job 42 ended Blocked", outcome="Blocked")
    second = JobLog.open(tmp_path, 42, 1 << 20, {"worker": "w2"})
    second.write(b"second attempt\n")
    assert (first.attempt, second.attempt) == (1, 2)
    assert logdir.attempts(tmp_path, 42) == [1, 2]
    assert logdir.attempt_path(tmp_path, 42) == tmp_path / "42" / "2.log"
    assert logdir.attempt_path(tmp_path, 42, 1).read_bytes() == b"first attempt\nrbit: job 42 ended Blocked\n"
    assert logdir.attempt_path(tmp_path, 43) is None
    meta = logdir.read_meta(first.path)
    assert (meta["job"], meta["attempt"], meta["worker"], meta["outcome"]) == (42, 1, "w1", "Blocked")
    assert meta["pid"] == os.getpid() and meta["bytes"] == first.size
    assert "outcome" not in logdir.read_meta(second.path)
    second.close("end", outcome="Done")


def test_rbit_lines_start_on_a_line_of_their_own(tmp_path):
    """rbit's own lines (start, end) never run into a last line without a newline."""
    log = JobLog.open(tmp_path, 1, 1 << 20, {})
    log.note("rbit: start")
    log.write(b"no newline at the end")
    log.close("rbit: end", outcome="Done")
    assert log.path.read_bytes() == b"rbit: start\nno newline at the end\nrbit: end\n"


@pytest.mark.parametrize("chunk", [1, 777, 100_000])
def test_cap_keeps_head_and_tail_and_says_how_much_was_left_out(tmp_path, chunk):
    """log_max: past it, the file keeps its first half and its newest bytes, never grows past the
    cap (plus the line that says so), and says how many bytes were left out."""
    data = numbered(20_000)  # 260,000 bytes
    log = JobLog.open(tmp_path, 1, 16384, {})
    for start in range(0, len(data), chunk):
        log.write(data[start:start + chunk])
        assert os.path.getsize(log.path) <= 16384
    log.close("rbit: the end", outcome="Done")
    text = log.path.read_bytes()
    left_out = len(data) + len(b"rbit: the end\n") - (16384 - joblog.MARKER_RESERVE)
    marker = (f"[rbit: {left_out} bytes left out here: this log keeps its first 8192 and its last "
              f"{8192 - joblog.MARKER_RESERVE} bytes (log_max 16384)]\n").encode()
    head, _, tail = text.partition(marker)
    assert head == data[:8192] + b"\n"  # the head ends mid-line: the marker gets a line of its own
    assert tail == (data + b"rbit: the end\n")[-(8192 - joblog.MARKER_RESERVE):]
    assert len(text) <= 16384 + len(marker)
    assert not log.path.with_suffix(".tail").exists()
    assert logdir.read_meta(log.path)["left_out"] == left_out


def test_a_reader_follows_a_capped_log_while_it_grows_and_after_it_ends(tmp_path):
    """Offsets count the bytes of the log as written: a reader past the head is told what was left
    out and goes on with the newest part, before and after the job's end."""
    log = JobLog.open(tmp_path, 1, 8192, {})
    data = numbered(3000)
    log.write(data[:5000])
    seen, offset = read_all(log)
    assert seen == data[:5000] and offset == 5000
    log.write(data[5000:])
    more, offset = read_all(log, offset)
    assert more.startswith(b"\n[rbit: ") and b" bytes left out here]\n" in more
    assert more.endswith(data[-100:]) and offset == len(data)
    log.close("rbit: end", outcome="Done")
    last, offset = read_all(log, offset)
    assert last == b"rbit: end\n" and offset == log.size
    whole, _ = read_all(log)
    assert whole.startswith(data[:4096]) and whole.endswith(data[-1000:] + b"rbit: end\n")


def test_a_full_disk_loses_output_never_the_job_and_the_log_says_what_was_lost(tmp_path, monkeypatch):
    """A write that fails (ENOSPC) raises nothing: the output is counted as lost, and once writing
    works again the log says how many bytes were lost there, and why."""
    log = JobLog.open(tmp_path, 1, 1 << 20, {"job": 1})
    log.write(b"before\n")
    real = joblog._pwrite_all

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(joblog, "_pwrite_all", full)
    log.write(b"x" * 1000)
    log.write(b"y" * 234)
    monkeypatch.setattr(joblog, "_pwrite_all", real)
    log.write(b"after\n")
    log.close("rbit: end", outcome="Done")
    assert log.path.read_bytes() == (b"before\n[rbit: 1234 bytes of output lost here: No space left on device]\n"
                                     b"after\nrbit: end\n")
    assert logdir.read_meta(log.path)["lost"] == 1234


def test_a_disk_still_full_at_the_end_puts_the_notice_over_the_logs_last_bytes(tmp_path, monkeypatch):
    """When nothing can be added any more, the notice of the loss replaces the log's last bytes
    (which needs no new disk blocks), so the log still says what was lost."""
    log = JobLog.open(tmp_path, 1, 1 << 20, {})
    log.write(b"z" * 4000)
    real = joblog._pwrite_all
    monkeypatch.setattr(joblog, "_pwrite_all", lambda fd, data, offset: (
        real(fd, data, offset) if offset + len(data) <= 4000 else (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))))
    log.write(b"lost" * 10)
    log.close("rbit: end", outcome="Done")
    lost = 40 + len(b"\nrbit: end\n")  # rbit's end line could not be added either
    assert log.path.read_bytes().endswith(b"[rbit: %d bytes of output lost here: No space left on device]\n" % lost)


def test_an_unwritable_log_dir_loses_the_output_and_nothing_else(tmp_path):
    """A log directory that cannot be made: the log counts what it loses, writes raise nothing."""
    (tmp_path / "file").write_text("not a directory")
    log = JobLog.open(tmp_path / "file", 5, 1 << 20, {"job": 5})
    assert log.path is None and log.error
    log.write(b"output\n")
    log.close("rbit: end", outcome="Done")
    assert log.lost_total == len(b"output\nrbit: end\n")
    assert log.read(0) == (b"", 0)


def test_retention_removes_logs_older_than_log_keep(tmp_path):
    """log_keep: attempt files older than that many days are removed (empty job directories too);
    newer ones, the running jobs' and files rbit did not write stay."""
    old = time.time() - 20 * 86400
    for job, attempt, when in ((1, 1, old), (1, 2, time.time()), (2, 1, old), (3, 1, old)):
        for suffix in ("log", "json"):
            path = tmp_path / str(job) / f"{attempt}.{suffix}"
            path.parent.mkdir(exist_ok=True)
            path.write_text("x")
            os.utime(path, (when, when))
    (tmp_path / "notes").mkdir()
    os.utime(tmp_path / "notes", (old, old))
    removed = logdir.sweep(tmp_path, 14, keep_jobs={3})
    assert removed == 4
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["2.json", "2.log"]
    assert not (tmp_path / "2").exists()
    assert (tmp_path / "3" / "1.log").exists() and (tmp_path / "notes").exists()
    assert logdir.sweep(tmp_path, 0) == 0  # 0 keeps every log


def test_log_settings_and_their_defaults(tmp_path):
    """[rbit] log_dir (default: systemd's $LOGS_DIRECTORY/jobs, else $XDG_STATE_HOME/rbit/jobs,
    else ~/.local/state/rbit/jobs; relative to the configuration file), log_max (bytes with K, M
    or G; default 100M), log_keep (days; default 14), log_echo (default false)."""
    path = write_config(tmp_path / "rbit.ini", name="w", vhost=None, runners={"a_b_c_d": {"runner": "shell!true"}})
    worker = config_module.load(path, environ={"HOME": "/home/rbit"}).worker
    assert worker.log_dir == Path("/home/rbit/.local/state/rbit/jobs")
    assert (worker.log_max, worker.log_keep, worker.log_echo) == (100 << 20, 14, False)
    assert config_module.load(path, environ={"XDG_STATE_HOME": "/s", "HOME": "/h"}).worker.log_dir == Path("/s/rbit/jobs")
    assert config_module.load(path, environ={"LOGS_DIRECTORY": "/var/log/rbit", "HOME": "/h"}).worker.log_dir == \
        Path("/var/log/rbit/jobs")
    path = write_config(tmp_path / "rbit.ini", name="w", vhost=None, runners={"a_b_c_d": {"runner": "shell!true"}},
                        rbit={"log_dir": "joblogs", "log_max": "1M", "log_keep": "0.5", "log_echo": "true"})
    worker = config_module.load(path, environ={}).worker
    assert worker.log_dir == tmp_path / "joblogs"
    assert (worker.log_max, worker.log_keep, worker.log_echo) == (1 << 20, 0.5, True)
    assert [parse_size(text, "k") for text in ("4096", "8K", "3m", " 2 G ")] == [4096, 8192, 3 << 20, 2 << 30]


@pytest.mark.parametrize("key, value, message", [
    ("log_max", "lots", "must be a size in bytes, like 100M (K, M or G), not 'lots'"),
    ("log_max", "1T", "must be a size in bytes, like 100M (K, M or G), not '1T'"),
    ("log_max", "100", "must be at least 4096, not '100'"),
    ("log_keep", "forever", "must be a number of days, not 'forever'"),
    ("log_keep", "-1", "must be at least 0, not '-1'"),
    ("log_echo", "maybe", "must be true or false, not 'maybe'"),
])
def test_bad_log_settings_are_configuration_errors(tmp_path, key, value, message):
    """A log setting that is not one stops rbit at start, naming the key."""
    path = write_config(tmp_path / "rbit.ini", name="w", vhost=None, runners={"a_b_c_d": {"runner": "shell!true"}},
                        rbit={key: value})
    with pytest.raises(ConfigError) as error:
        config_module.load(path, environ={})
    assert (error.value.section, error.value.key) == ("rbit", key)
    assert message in error.value.reason


def test_meta_is_json_readable_by_other_tools(tmp_path):
    """ATTEMPT.json is plain JSON (rbit logs --follow reads it to know when the attempt ended)."""
    log = JobLog.open(tmp_path, 9, 1 << 20, {"worker": "w", "package": "p"})
    log.close("end", outcome="Failed", duration=1.5)
    meta = json.loads(log.path.with_suffix(".json").read_text())
    assert meta["outcome"] == "Failed" and meta["duration"] == 1.5 and meta["package"] == "p"


def test_the_systemd_unit_gives_the_job_logs_a_directory():
    """contrib/rbit.service: LogsDirectory=rbit, so systemd makes /var/log/rbit for the service's user
    and sets $LOGS_DIRECTORY, where the job logs go by default."""
    lines = (ROOT / "contrib" / "rbit.service").read_text().splitlines()
    assert "LogsDirectory=rbit" in lines
