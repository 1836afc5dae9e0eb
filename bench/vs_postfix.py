"""``python -m bench postfix``: mailgrid and Postfix side by side under smtp-source.

Both peers run at once on loopback and get the same load from Postfix's own generator
`smtp-source` (a new connection per message: no ``-d``), alternating round by round so
that noise on the machine hits both alike:
- 4 KB messages over 20 parallel sessions, 100 KB over 10, ``--messages`` each;
- rate = messages / seconds from smtp-source's start until the last message is
  delivered: a file in Maildir/new for Postfix (virtual(8)), visible through the HTTP API
  for mailgrid (the totals of GET /v1/folders);
- server CPU per message: the whole process tree (Postfix: master and every child, the
  short-lived ones included; mailgrid: `mailgrid up`, nats-server and every service);
- peak RSS of the tree, sampled every 100 ms.
A round whose smtp-source fails (any non-2xx reply aborts it) or whose delivered count
differs from the sent count is reported as an error, never as a number.

Then, for mailgrid alone: idle RSS of the suite, and folder listing on a 100,000-message
inbox (bench/listing.py), unless ``--no-listing``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import listing as listing_bench
from bench.postfix import SMTP_SOURCE, PostfixInstance, install_postfix, postfix_version
from bench.procs import TreeMeter, tree, tree_pss_bytes, tree_rss_bytes
from bench.stats import median, percentile
from bench.suite import Suite
from mailgrid.natsd import free_port
from mailgrid.settings import Settings

DOMAIN = "bench.test"
USER = "bench"
PASSWORD = "bench-password-1"
SENDER = "sender@client.example"
HELO = "client.example"
# (payload bytes, parallel sessions): the load of issue 10.
PLAN: tuple[tuple[int, int], ...] = ((4 * 1024, 20), (100 * 1024, 10))
# Per-message work mailgrid would do that Postfix does not: SPF/DKIM/DMARC need DNS, and
# Postfix checks none of them either.
MAILGRID_ENV = {"MAILGRID_INBOUND_AUTH_CHECKS": "false"}
MiB = 1024 * 1024
# How long after smtp-source ends the last message may take to be delivered.
DRAIN_TIMEOUT = 300.0
# Poll interval of the delivered count; polling only starts once smtp-source is done, so
# it does not load the servers while they take mail.
POLL = 0.02
# The longest sleep between polls, which bounds how late a round's end is seen. The rate
# seen so far is a poor guess of the time left when deliveries come in lumps (mailgrid
# files a batch of a hundred messages or more at once, after a quiet 0.1-0.3 s): with a
# one-second bound, a round could be timed up to a second after its last delivery.
MAX_POLL = 0.1


class RoundFailed(Exception):
    """A round that must not be reported as a number (the reason says why)."""


@dataclass
class Round:
    peer: str
    size: int
    sessions: int
    messages: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss: int = 0
    peak_pss: int = 0
    smtp_seconds: float = 0.0
    # After the last delivery, until the tree went quiet (its CPU is counted).
    settle_seconds: float = 0.0
    error: str = ""
    # CPU seconds per process name (Postfix: short-lived daemons count under "master").
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    # Largest RSS sample per process name, MiB.
    peak_rss_mib_by_process: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else float("nan")

    @property
    def cpu_ms_per_message(self) -> float:
        return self.cpu_seconds * 1000 / self.messages if self.messages else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate if self.ok else None,
                "cpu_ms_per_message": self.cpu_ms_per_message if self.ok else None}


@dataclass
class Summary:
    peer: str
    size: int
    sessions: int
    rounds_ok: int
    rounds: int
    rate: float
    cpu_ms_per_message: float
    peak_rss_mib: float
    peak_pss_mib: float


def summarize(rounds: Sequence[Round]) -> list[Summary]:
    """Per (size, peer): median rate and CPU/msg over the good rounds, max peak RSS."""
    out: list[Summary] = []
    keys = sorted({(r.size, r.sessions, r.peer) for r in rounds},
                  key=lambda k: (k[0], k[2] != "postfix", k[2]))
    for size, sessions, peer in keys:
        mine = [r for r in rounds if (r.size, r.sessions, r.peer) == (size, sessions, peer)]
        good = [r for r in mine if r.ok]
        out.append(Summary(
            peer, size, sessions, len(good), len(mine),
            median([r.rate for r in good]),
            median([r.cpu_ms_per_message for r in good]),
            max(r.peak_rss for r in good) / MiB if good else float("nan"),
            max(r.peak_pss for r in good) / MiB if good else float("nan")))
    return out


def ratios(summaries: Sequence[Summary], size: int) -> dict[str, float] | None:
    by_peer = {s.peer: s for s in summaries if s.size == size}
    mg, pf = by_peer.get("mailgrid"), by_peer.get("postfix")
    if mg is None or pf is None:
        return None
    return {"rate": _ratio(mg.rate, pf.rate),
            "cpu_ms_per_message": _ratio(mg.cpu_ms_per_message, pf.cpu_ms_per_message),
            "peak_rss": _ratio(mg.peak_rss_mib, pf.peak_rss_mib),
            "peak_pss": _ratio(mg.peak_pss_mib, pf.peak_pss_mib)}


def paired_rate_ratio(rounds: Sequence[Round], size: int) -> float:
    """The median over round numbers of mailgrid's rate over Postfix's in the same
    round: the two run minutes apart, so a drift of the machine's speed over the run
    (often 20% or more on a shared VM) moves both sides of each ratio alike."""
    def good(peer: str) -> list[Round | None]:
        return [r if r.ok else None for r in rounds if (r.size, r.peer) == (size, peer)]

    pairs = zip(good("mailgrid"), good("postfix"), strict=False)
    return median([mg.rate / pf.rate for mg, pf in pairs if mg and pf and pf.rate])


def _ratio(a: float, b: float) -> float:
    """a/b; NaN when either is missing (NaN) or b is zero."""
    return a / b if b and b == b and a == a else float("nan")


def format_table(summaries: Sequence[Summary]) -> str:
    head = (f"{'size':>7}  {'sessions':>8}  {'peer':<18} {'msgs/s':>8}  {'CPU ms/msg':>10}  "
            f"{'peak RSS MiB':>12}  {'peak PSS MiB':>12}  rounds ok")
    lines = [head, "-" * len(head)]
    for size in sorted({s.size for s in summaries}):
        for s in (s for s in summaries if s.size == size):
            row = f"{_size(size):>7}  {s.sessions:>8}  {s.peer:<18} "
            if not s.rounds_ok:
                lines.append(row + f"{'every round FAILED (see above)':<59}0/{s.rounds}")
                continue
            lines.append(
                row + f"{s.rate:8.1f}  {s.cpu_ms_per_message:10.2f}  {s.peak_rss_mib:12.1f}  "
                f"{s.peak_pss_mib:12.1f}  {s.rounds_ok}/{s.rounds}")
        r = ratios(summaries, size)
        if r is not None:
            lines.append(
                f"{_size(size):>7}  {'':>8}  {'mailgrid/postfix':<18} {_x(r['rate']):>8}  "
                f"{_x(r['cpu_ms_per_message']):>10}  {_x(r['peak_rss']):>12}  "
                f"{_x(r['peak_pss']):>12}")
    return "\n".join(lines)


def _x(ratio: float) -> str:
    return "n/a" if ratio != ratio else f"{ratio:.2f}x"


def _size(size: int) -> str:
    return f"{size // 1024} KB"


# smtp-source ---------------------------------------------------------------------------

def smtp_source_command(port: int, size: int, sessions: int, messages: int,
                        rcpt: str) -> list[str]:
    """smtp-source with a new connection per message (no -d), aborting on any reply that
    is not the expected positive one (no -A)."""
    return [str(SMTP_SOURCE), "-4", "-s", str(sessions), "-l", str(size), "-m", str(messages),
            "-M", HELO, "-f", SENDER, "-t", rcpt, "-S", "bench message",
            f"127.0.0.1:{port}"]


_DIAG = re.compile(r"^(?:\S*/)?smtp-source: (fatal|warning|error|panic): (.*)$")


def smtp_source_failure(returncode: int, output: str) -> str | None:
    """None when smtp-source succeeded, else its diagnostics (the server's reply when it
    refused something, e.g. "fatal: RCPT TO rejected: 421 4.7.0 ...")."""
    diags = [m.group(1) + ": " + m.group(2) for line in output.splitlines()
             if (m := _DIAG.match(line.strip()))]
    if returncode == 0 and not any(d.startswith(("fatal", "panic", "error")) for d in diags):
        return None
    if not diags:
        diags = [line for line in output.splitlines() if line.strip()][-5:] or ["no output"]
    return f"smtp-source exited {returncode}: " + " | ".join(diags)


def run_round(peer: str, size: int, sessions: int, messages: int, port: int,
              rcpt: str, roots: Callable[[], list[int]],
              delivered: Callable[[], int]) -> Round:
    result = Round(peer, size, sessions, messages)
    before = delivered()
    meter = TreeMeter(roots(), namer=process_name)
    meter.start()
    started = time.perf_counter()
    try:
        done = subprocess.run(smtp_source_command(port, size, sessions, messages, rcpt),
                              capture_output=True, text=True, check=False)
        result.smtp_seconds = time.perf_counter() - started
        failure = smtp_source_failure(done.returncode, done.stdout + done.stderr)
        if failure:
            raise RoundFailed(failure)
        count = _wait_for(before + messages, delivered)
        result.seconds = time.perf_counter() - started
        # The rate ends at the last delivery; the CPU cost also counts what the servers
        # still do for those messages afterwards (mailgrid's search indexing).
        result.settle_seconds = meter.settle()
        meter.stop()  # before the duplicate check below: its wait is not the servers' work
        if count != before + messages:
            raise RoundFailed(f"delivered {count - before} of {messages} messages")
        # Anything more arriving late (a duplicate) must show up here.
        time.sleep(0.5)
        if (late := delivered()) != before + messages:
            raise RoundFailed(f"delivered {late - before} messages for {messages} sent")
    except RoundFailed as exc:
        result.error = str(exc)
    finally:
        meter.stop()
    result.cpu_seconds, result.peak_rss = meter.cpu_seconds, meter.peak_rss
    result.peak_pss = meter.peak_pss
    result.cpu_by_process = {k: round(v, 3) for k, v in meter.cpu_by_process.items()}
    result.peak_rss_mib_by_process = {
        k: round(v / MiB, 1) for k, v in sorted(meter.peak_rss_by_process.items(),
                                                 key=lambda kv: -kv[1])}
    return result


def _wait_for(target: int, delivered: Callable[[], int]) -> int:
    """Polls until ``target`` is reached. Each poll of mailgrid is an HTTP request the
    servers must answer (and that their CPU count includes), so polls are spaced by half
    the time the remaining messages should take at the rate seen so far, between POLL
    and MAX_POLL (the end time is precise to MAX_POLL at worst, to about POLL near the
    end)."""
    started = time.monotonic()
    deadline = started + DRAIN_TIMEOUT
    first = count = delivered()
    while count < target and time.monotonic() < deadline:
        time.sleep(poll_delay(target - count, count - first, time.monotonic() - started))
        count = delivered()
    return count


def poll_delay(remaining: int, done: int, elapsed: float) -> float:
    if done <= 0 or elapsed <= 0:
        return min(MAX_POLL, max(POLL, elapsed / 2))
    return min(MAX_POLL, max(POLL, remaining / (done / elapsed) / 2))


# mailgrid ------------------------------------------------------------------------------

@dataclass
class MailgridPeer:
    suite: Suite
    http: httpx.Client | None = None
    token: str = ""

    def start(self) -> None:
        self.suite.start()
        self.suite.mailgrid("user", "add", f"{USER}@{DOMAIN}", "--password", PASSWORD)
        self.http = httpx.Client(base_url=f"http://{self.suite.http_addr}", timeout=30)
        reply = self.http.post("/v1/auth/token",
                               json={"address": f"{USER}@{DOMAIN}", "password": PASSWORD})
        reply.raise_for_status()
        self.token = str(reply.json()["access_token"])

    def roots(self) -> list[int]:
        assert self.suite.process is not None
        return [self.suite.process.pid]

    def folder_totals(self) -> dict[str, int]:
        assert self.http is not None
        reply = self.http.get("/v1/folders", headers={"Authorization": f"Bearer {self.token}"})
        reply.raise_for_status()
        return {f["role"] or f["name"]: int(f["total"]) for f in reply.json()["folders"]}

    def delivered(self) -> int:
        """Messages visible to the user in any folder (the spam filter may file some in
        Spam: they are delivered all the same, and counted in the notes)."""
        return sum(self.folder_totals().values())

    def stop(self) -> None:
        if self.http is not None:
            self.http.close()
        self.suite.stop()


# the whole benchmark --------------------------------------------------------------------

def machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = next(int(line.split()[1]) for line in
                       Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal:"))
        memory = f"{mem_kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        memory = "unknown"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    # Read-only: does the tree differ from that commit (work in progress measured)?
    if commit and subprocess.run(["git", "diff", "--quiet", "HEAD", "--"],
                                 capture_output=True, check=False).returncode == 1:
        commit += " + uncommitted changes"
    return {"nproc": str(os.cpu_count()), "cpu": model or platform.processor(),
            "memory": memory, "kernel": platform.release(),
            # Which build, too: a PGO+LTO build and a plain one differ by some percent here.
            "python": f"{platform.python_version()} ({os.path.realpath(sys.executable)})",
            "postfix": postfix_version(),
            "mailgrid_commit": commit or "unknown"}


def mailgrid_per_message_work(env: dict[str, str]) -> list[str]:
    """What mailgrid does per message with the settings it runs under here."""
    settings = Settings.model_validate(
        {k.removeprefix("MAILGRID_").lower(): v for k, v in env.items()})
    inline = settings.inbound_inline_max_bytes
    work = ["SMTP edge (aiosmtpd) publishes the message on JetStream (stored and fsynced) "
            f"before 250: inside its INBOUND job up to {inline // 1024} KiB, jobs accepted "
            "together in one message; larger ones go to the blob store first",
            f"delivery_svc (CPU niceness {settings.delivery_nice}) parses MIME "
            "(mailgrid.mime) and files the jobs it fetched with one "
            "StoreDeliveries call: raw bytes into the blob store (one group sync), one copy "
            "per recipient into the SQLite metadata store with its event outbox, in one "
            "transaction",
            f"spam score per recipient (delivery_svc/checks/spam.py, threshold "
            f"{settings.spam_threshold:g})",
            "search_svc indexes every message (tantivy) from the events stream, at CPU "
            f"niceness {settings.search_nice}, holding a batch up to "
            f"{settings.search_index_max_delay:g} s while the machine has no CPU to spare "
            "(its CPU is counted until the tree is quiet); "
            "realtime_svc fans events out (no client connected here)",
            f"log level {settings.log_level} (mailgrid's default is INFO: a line per "
            "accepted message and per filed job)"]
    work.append("SPF/DKIM/DMARC: " + ("ON" if settings.inbound_auth_checks else
                                      "off (MAILGRID_INBOUND_AUTH_CHECKS=false; Postfix "
                                      "does none either)"))
    work.append("clamd virus scan: " + (f"ON ({settings.clamd_address})"
                                        if settings.clamd_address else
                                        "off (clamd_address empty, the default)"))
    return work


def run(args: argparse.Namespace) -> dict[str, Any]:
    install_postfix()
    info = machine()
    report: dict[str, Any] = {"machine": info, "messages": args.messages,
                              "rounds": args.rounds, "plan": [list(p) for p in PLAN]}
    env = dict(MAILGRID_ENV)
    env.update(kv.split("=", 1) for kv in args.mailgrid_env)
    report["mailgrid_env"] = env
    report["mailgrid_per_message_work"] = mailgrid_per_message_work(env)
    print(f"machine: {info}", flush=True)
    print("mailgrid per-message work in this run:", *report["mailgrid_per_message_work"],
          sep="\n  - ", flush=True)
    with tempfile.TemporaryDirectory(prefix="mailgrid-vs-postfix-") as tmp:
        report.update(side_by_side(Path(tmp), args, env))
    if args.listing:
        try:
            report["listing"] = listing(args.listing_count)
        except (RuntimeError, OSError, httpx.HTTPError, AssertionError) as exc:
            # The side-by-side numbers above stand; say why this part has none.
            print(f"  folder listing FAILED: {exc!r}", flush=True)
            report["listing"] = {"messages": args.listing_count, "error": repr(exc)}
    return report


def side_by_side(tmp: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    tmp.chmod(0o755)  # Postfix's daemons run as user postfix and must reach their dirs
    postfix = PostfixInstance(tmp / "postfix", free_port(), DOMAIN, USER)
    suite = Suite(tmp / "mailgrid", domains=DOMAIN, extra_env=env)
    mailgrid = MailgridPeer(suite)
    rounds: list[Round] = []
    out: dict[str, Any] = {}
    try:
        postfix.start()
        mailgrid.start()
        time.sleep(2)  # let both settle before the idle snapshot
        out["idle"] = {name: idle(roots) for name, roots in (
            ("postfix", [_pid(postfix.master_pid())]), ("mailgrid", mailgrid.roots()))}
        for name, snap in out["idle"].items():
            print(f"idle {name} (whole process tree): RSS {snap['rss_mib']:.1f} MiB, PSS "
                  f"{snap['pss_mib']:.1f} MiB; {snap['processes']}", flush=True)
        peers: list[tuple[str, int, Callable[[], list[int]], Callable[[], int]]] = [
            ("postfix", postfix.port, lambda: [_pid(postfix.master_pid())],
             postfix.delivered),
            ("mailgrid", int(suite.smtp_addr.rsplit(":", 1)[1]), mailgrid.roots,
             mailgrid.delivered)]
        for size, sessions in PLAN:
            for n in range(args.rounds):
                for peer, port, roots, delivered in peers:
                    r = run_round(peer, size, sessions, args.messages, port,
                                  f"{USER}@{DOMAIN}", roots, delivered)
                    rounds.append(r)
                    print("  " + _round_line(r, n + 1), flush=True)
        totals = mailgrid.folder_totals()
        out["mailgrid_folder_totals"] = totals
        if totals.get("spam"):
            print(f"  note: mailgrid filed {totals['spam']} messages in Spam (counted as "
                  "delivered)", flush=True)
    finally:
        mailgrid.stop()
        postfix.stop()
    summaries = summarize(rounds)
    print()
    print(format_table(summaries), flush=True)
    out["rounds_detail"] = [r.as_json() for r in rounds]
    out["summary"] = [asdict(s) for s in summaries]
    out["ratios"] = {_size(size): ratios(summaries, size) for size, _ in PLAN}
    for size, _ in PLAN:
        paired = paired_rate_ratio(rounds, size)
        print(f"{_size(size):>7}  mailgrid/postfix msgs/s, median of round-by-round ratios: "
              f"{_x(paired)}", flush=True)
        if out["ratios"][_size(size)] is not None:
            out["ratios"][_size(size)]["rate_paired"] = paired
    return out


def idle(roots: list[int]) -> dict[str, Any]:
    """Memory of an idle tree, and what runs in it."""
    names: dict[str, int] = {}
    for proc in tree(roots):
        try:
            name = process_name(proc)
        except psutil.Error:
            continue
        names[name] = names.get(name, 0) + 1
    return {"rss_mib": tree_rss_bytes(roots) / MiB, "pss_mib": tree_pss_bytes(roots) / MiB,
            "processes": names}


def process_name(proc: psutil.Process) -> str:
    return command_name(proc.cmdline())


def command_name(cmd: list[str]) -> str:
    """'mailgrid serve gateway', 'mailgrid up', 'nats-server', 'smtpd', ... for a command
    line."""
    if "serve" in cmd[:-1]:
        return "mailgrid serve " + cmd[cmd.index("serve") + 1]
    if cmd[-1:] == ["up"]:
        return "mailgrid up"
    return Path(cmd[0]).name if cmd else "?"


def _pid(pid: int | None) -> int:
    if pid is None:
        raise RuntimeError("the private postfix has no master pid")
    return pid


def _round_line(r: Round, n: int) -> str:
    head = f"{_size(r.size):>6} s={r.sessions:<3} {r.peer:<9} round {n}: "
    if not r.ok:
        return head + "FAILED: " + r.error
    return (head + f"{r.rate:7.1f} msgs/s  ({r.messages} in {r.seconds:.2f} s, smtp-source "
            f"{r.smtp_seconds:.2f} s)  CPU {r.cpu_ms_per_message:.2f} ms/msg "
            f"(quiet {r.settle_seconds:.1f} s later)  "
            f"peak RSS {r.peak_rss / MiB:.1f} MiB, PSS {r.peak_pss / MiB:.1f} MiB\n"
            f"{'':>{len(head) + 2}}CPU ms/msg by process: " + ", ".join(
                f"{name.removeprefix('mailgrid serve ')} {secs * 1000 / r.messages:.2f}"
                for name, secs in r.cpu_by_process.items() if secs * 1000 / r.messages >= 0.05)
            + f"\n{'':>{len(head) + 2}}peak RSS MiB by process: " + ", ".join(
                f"{name.removeprefix('mailgrid serve ')} {mib:.0f}"
                for name, mib in list(r.peak_rss_mib_by_process.items())[:8]))


def listing(count: int) -> dict[str, Any]:
    """bench/listing.py's measurement, returned as numbers for the JSON report."""
    with tempfile.TemporaryDirectory(prefix="mailgrid-bench-") as tmp:
        suite = Suite(Path(tmp) / "data")
        settings = Settings(data_dir=suite.data_dir)
        print(f"\nFolder listing ({count} messages in the inbox, "
              f"{listing_bench.PAGE_SIZE} per page)", flush=True)
        started = time.perf_counter()
        asyncio.run(listing_bench.fill(settings, count))
        print(f"  filled in {time.perf_counter() - started:.0f} s", flush=True)
        suite.start(timeout=300)
        try:
            timings = asyncio.run(listing_bench.measure(f"http://{suite.http_addr}", 300))
        finally:
            suite.stop()
    result: dict[str, Any] = {"messages": count}
    for name, values in timings.items():
        result[name] = {"p50_ms": percentile(values, 50) * 1000,
                        "p99_ms": percentile(values, 99) * 1000}
        print(f"  {name:<18} p50 {result[name]['p50_ms']:6.1f} ms   "
              f"p99 {result[name]['p99_ms']:6.1f} ms", flush=True)
    return result


def jsonable(value: Any) -> Any:
    """NaN (a number that could not be measured) → null; paths → str; recursively."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench postfix",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--messages", type=int, default=5000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per peer and size")
    parser.add_argument("--json", type=Path, default=Path("bench/results/vs_postfix.json"),
                        help="where to write the results")
    parser.add_argument("--no-listing", dest="listing", action="store_false",
                        help="skip the folder listing benchmark (slow to fill)")
    parser.add_argument("--listing-count", type=int, default=100_000)
    parser.add_argument("--mailgrid-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra MAILGRID_* setting for the suite (repeatable)")
    parser.add_argument("--markdown", action="store_true",
                        help="only print the Markdown tables of the --json file "
                             "(for docs/PERFORMANCE.md)")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> None:
    args = parse_args(argv)
    if args.markdown:
        from bench.vs_postfix_md import markdown

        print(markdown(json.loads(args.json.read_text())), end="")
        return
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop Postfix and the suite.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    report = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")
    print(f"\nresults written to {args.json}", file=sys.stderr)
