"""The pure parts of `python -m bench postfix`: the private Postfix's configuration, the
smtp-source command and how its failures are read, and the summary table."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import vs_postfix
from bench.postfix import main_cf, master_cf
from bench.procs import TreeMeter
from bench.vs_postfix import (
    MAX_POLL,
    POLL,
    Round,
    command_name,
    format_table,
    jsonable,
    paired_rate_ratio,
    poll_delay,
    ratios,
    smtp_source_command,
    smtp_source_failure,
    summarize,
)


def _config(text: str) -> dict[str, str]:
    pairs = (line.split(" = ", 1) for line in text.splitlines() if line.strip())
    return {key: value for key, value in pairs}


def _main_cf() -> dict[str, str]:
    root = Path("/tmp/pf")
    return _config(main_cf(
        config_dir=root / "etc", queue_dir=root / "spool", data_dir=root / "lib",
        maildir_base=root / "vmail", domain="bench.test",
        mailbox_map=root / "etc" / "vmailbox", uid=65534, gid=65534, mail_owner="postfix"))


def test_private_postfix_uses_its_own_directories_and_loopback_only() -> None:
    cf = _main_cf()
    assert cf["config_directory"] == "/tmp/pf/etc"
    assert cf["queue_directory"] == "/tmp/pf/spool"
    assert cf["data_directory"] == "/tmp/pf/lib"
    assert cf["inet_interfaces"] == "loopback-only"
    assert cf["maillog_file"].startswith(cf["maillog_file_prefixes"])


def test_private_postfix_delivers_the_test_domain_with_virtual_into_a_maildir() -> None:
    cf = _main_cf()
    assert cf["virtual_mailbox_domains"] == "bench.test"
    assert cf["virtual_mailbox_base"] == "/tmp/pf/vmail"
    assert cf["virtual_mailbox_maps"] == "texthash:/tmp/pf/etc/vmailbox"
    assert cf["virtual_uid_maps"] == cf["virtual_gid_maps"] == "static:65534"
    assert cf["mydestination"] == ""


def test_private_postfix_keeps_postfix_defaults_for_durability_and_limits() -> None:
    cf = _main_cf()
    # Nothing that would make Postfix cheaper than stock: no fsync or anvil overrides.
    assert not [key for key in cf if "fsync" in key or "anvil" in key
                or key.startswith("smtpd_client_")]


def test_master_cf_runs_smtpd_on_the_loopback_port_and_virtual_unprivileged() -> None:
    rows = {line.split()[0]: line.split() for line in master_cf(2600).splitlines()}
    assert rows["127.0.0.1:2600"][1:2] + rows["127.0.0.1:2600"][-1:] == ["inet", "smtpd"]
    assert rows["virtual"][-1] == "virtual"
    assert "postlog" in rows


def test_smtp_source_opens_a_new_connection_per_message_and_aborts_on_refusal() -> None:
    cmd = smtp_source_command(2525, 4096, 20, 5000, "bench@bench.test")
    assert "-d" not in cmd and "-A" not in cmd
    assert cmd[cmd.index("-s") + 1] == "20"
    assert cmd[cmd.index("-l") + 1] == "4096"
    assert cmd[cmd.index("-m") + 1] == "5000"
    assert cmd[-1] == "127.0.0.1:2525"


def test_smtp_source_success_is_no_failure() -> None:
    assert smtp_source_failure(0, "") is None


def test_smtp_source_refusal_reports_the_servers_exact_reply() -> None:
    output = ("/usr/sbin/smtp-source: fatal: rejected at server banner: 421 4.7.0 Too many "
              "connections from your address, try later\n")
    failure = smtp_source_failure(1, output)
    assert failure == ("smtp-source exited 1: fatal: rejected at server banner: 421 4.7.0 "
                       "Too many connections from your address, try later")


def test_smtp_source_failure_without_diagnostics_keeps_its_last_lines() -> None:
    assert smtp_source_failure(2, "something odd\n") == "smtp-source exited 2: something odd"


def _round(peer: str, size: int, seconds: float, cpu: float, error: str = "") -> Round:
    return Round(peer, size, 20, 1000, seconds=seconds, cpu_seconds=cpu,
                 peak_rss=100 * 1024 * 1024, peak_pss=50 * 1024 * 1024, error=error)


def test_summary_takes_medians_of_good_rounds_and_ratios_mailgrid_over_postfix() -> None:
    rounds = [_round("postfix", 4096, s, 2.0) for s in (2.0, 4.0, 5.0)]
    rounds += [_round("mailgrid", 4096, s, 4.0) for s in (4.0, 8.0)]
    rounds.append(_round("mailgrid", 4096, 1.0, 0.1, error="smtp-source exited 1"))
    summaries = summarize(rounds)
    assert [(s.peer, s.rounds_ok, s.rounds) for s in summaries] == [
        ("postfix", 3, 3), ("mailgrid", 2, 3)]
    assert summaries[0].rate == 250.0  # median of 500, 250, 200
    assert summaries[1].rate == (250.0 + 125.0) / 2
    r = ratios(summaries, 4096)
    assert r is not None
    assert r["rate"] == summaries[1].rate / 250.0
    assert r["cpu_ms_per_message"] == 2.0
    assert "mailgrid/postfix" in format_table(summaries)


def test_paired_ratio_compares_each_round_with_the_postfix_round_beside_it() -> None:
    # The machine slows down by half over the run; within each round mailgrid takes
    # 1/0.8 of Postfix's time.
    rounds: list[Round] = []
    for seconds in (1.0, 1.5, 2.0):
        rounds += [_round("postfix", 4096, seconds, 1.0),
                   _round("mailgrid", 4096, seconds / 0.8, 1.0)]
    rounds.append(_round("postfix", 102400, 1.0, 1.0))
    rounds.append(_round("mailgrid", 102400, 1.0, 1.0, error="smtp-source exited 1"))
    assert paired_rate_ratio(rounds, 4096) == pytest.approx(0.8)
    assert math.isnan(paired_rate_ratio(rounds, 102400))  # no good pair


def test_a_peer_whose_every_round_failed_has_no_numbers() -> None:
    rounds = [_round("postfix", 4096, 2.0, 2.0),
              _round("mailgrid", 4096, 1.0, 1.0, error="delivered 10 of 1000 messages")]
    summaries = summarize(rounds)
    r = ratios(summaries, 4096)
    assert r is not None and all(math.isnan(v) for v in r.values())
    assert "every round FAILED" in format_table(summaries)
    assert jsonable({"rate": float("nan"), "p": Path("/x")}) == {"rate": None, "p": "/x"}


def test_process_names_of_the_suite_and_of_postfix_daemons() -> None:
    assert command_name(["/v/bin/python", "-m", "mailgrid", "serve", "gateway"]) == (
        "mailgrid serve gateway")
    assert command_name(["/v/bin/python", "-m", "mailgrid", "up"]) == "mailgrid up"
    assert command_name(["smtpd", "-n", "127.0.0.1:2525", "-t", "inet"]) == "smtpd"


def test_delivery_polls_are_sparse_far_from_the_end_and_dense_near_it() -> None:
    assert poll_delay(remaining=4000, done=1000, elapsed=10.0) == MAX_POLL
    assert poll_delay(remaining=2, done=1000, elapsed=10.0) == POLL
    assert POLL <= poll_delay(remaining=100, done=0, elapsed=0.0) <= MAX_POLL


class Clock:
    """A clock that only moves when slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_round_is_timed_at_most_max_poll_after_its_last_delivery(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliveries in lumps, as mailgrid files them: 10 of the last 200 in the first
    0.1 s, the rest at once at 0.3 s. The rate seen at first (100/s) would have the poll
    sleep most of a second."""
    clock = Clock()
    monkeypatch.setattr(vs_postfix, "time", clock)

    def delivered() -> int:
        return 4800 if clock.now < 0.05 else 4810 if clock.now < 0.3 else 5000

    assert vs_postfix._wait_for(5000, delivered) == 5000
    assert 0.3 <= clock.now <= 0.3 + MAX_POLL <= 0.4


def test_markdown_of_a_report_shows_the_ratio_and_failed_rounds_verbatim() -> None:
    from dataclasses import asdict

    from bench.vs_postfix_md import markdown

    rounds = [_round("postfix", 4096, 2.0, 2.0), _round("mailgrid", 4096, 4.0, 4.0),
              _round("mailgrid", 4096, 1.0, 1.0, error="smtp-source exited 1: fatal: 421")]
    summaries = summarize(rounds)
    report = jsonable({"summary": [asdict(s) for s in summaries],
                       "ratios": {"4 KB": ratios(summaries, 4096)},
                       "rounds_detail": [r.as_json() for r in rounds]})
    report["ratios"]["4 KB"]["rate_paired"] = 0.5
    text = markdown(report)
    assert "| 4 KB | | **mailgrid/Postfix** | **0.50x** | 2.00x |" in text
    assert "| 4 KB | | mailgrid/Postfix, median of round-by-round ratios | 0.50x |" in text
    assert "FAILED: `smtp-source exited 1: fatal: 421`" in text


def test_tree_meter_settles_after_the_deferred_work_and_counts_it() -> None:
    # A server that idles a moment after "delivery", keeps one CPU busy for a second
    # (deferred work, e.g. indexing once the burst is over), then idles.
    busy = ("import time\ntime.sleep(0.3)\nstart = time.monotonic()\n"
            "while time.monotonic() - start < 1.0: pass\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", busy])
    try:
        meter = TreeMeter([proc.pid])
        meter.start()
        waited = meter.settle(window=0.2, limit=10.0)
        meter.stop()
    finally:
        proc.kill()
        proc.wait()
    assert 1.3 <= waited < 5.0
    assert meter.cpu_seconds >= 0.9
