"""Markdown of a `python -m bench postfix` JSON report, for docs/PERFORMANCE.md:
``python -m bench postfix --markdown [--json PATH]`` prints it without running anything."""

from __future__ import annotations

from typing import Any


def _num(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _x(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def results_table(report: dict[str, Any]) -> str:
    rows = ["| size | sessions | peer | msgs/s (median) | CPU ms/msg (median) | "
            "peak RSS MiB | peak PSS MiB | rounds ok |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    summaries: list[dict[str, Any]] = report.get("summary", [])
    for size in sorted({s["size"] for s in summaries}):
        label = f"{size // 1024} KB"
        for s in (s for s in summaries if s["size"] == size):
            rows.append(
                f"| {label} | {s['sessions']} | {s['peer']} | {_num(s['rate'], '.1f')} | "
                f"{_num(s['cpu_ms_per_message'], '.2f')} | {_num(s['peak_rss_mib'], '.0f')} | "
                f"{_num(s['peak_pss_mib'], '.0f')} | {s['rounds_ok']}/{s['rounds']} |")
        r = report.get("ratios", {}).get(label)
        if r:
            rows.append(f"| {label} | | **mailgrid/Postfix** | **{_x(r['rate'])}** | "
                        f"{_x(r['cpu_ms_per_message'])} | {_x(r['peak_rss'])} | "
                        f"{_x(r['peak_pss'])} | |")
            if "rate_paired" in r:
                rows.append(f"| {label} | | mailgrid/Postfix, median of round-by-round "
                            f"ratios | {_x(r['rate_paired'])} | | | | |")
    return "\n".join(rows)


def rounds_table(report: dict[str, Any]) -> str:
    rows = ["| size | peer | round | msgs/s | seconds (smtp-source) | CPU ms/msg | result |",
            "|---|---|---:|---:|---:|---:|---|"]
    seen: dict[tuple[int, str], int] = {}
    for r in report.get("rounds_detail", []):
        n = seen[(r["size"], r["peer"])] = seen.get((r["size"], r["peer"]), 0) + 1
        if r["error"]:
            rows.append(f"| {r['size'] // 1024} KB | {r['peer']} | {n} | | | | "
                        f"FAILED: `{r['error']}` |")
            continue
        rows.append(f"| {r['size'] // 1024} KB | {r['peer']} | {n} | {r['rate']:.1f} | "
                    f"{r['seconds']:.1f} ({r['smtp_seconds']:.1f}) | "
                    f"{r['cpu_ms_per_message']:.2f} | ok |")
    return "\n".join(rows)


def machine_table(report: dict[str, Any]) -> str:
    rows = ["| | |", "|---|---|"]
    labels = {"nproc": "CPUs (nproc)", "cpu": "CPU model (/proc/cpuinfo)", "memory": "RAM",
              "kernel": "kernel", "python": "Python", "postfix": "Postfix",
              "mailgrid_commit": "mailgrid"}
    for key, label in labels.items():
        rows.append(f"| {label} | {report.get('machine', {}).get(key, '?')} |")
    return "\n".join(rows)


def listing_and_idle(report: dict[str, Any]) -> str:
    lines: list[str] = []
    idle = report.get("idle", {})
    if idle:
        lines += ["| idle, whole process tree | RSS MiB | PSS MiB | processes |",
                  "|---|---:|---:|---|"]
        for peer, snap in idle.items():
            procs = ", ".join(f"{name} x{n}" if n > 1 else name
                              for name, n in snap["processes"].items())
            lines.append(f"| {peer} | {snap['rss_mib']:.0f} | {snap['pss_mib']:.0f} | "
                         f"{procs} |")
        lines.append("")
    listing = report.get("listing")
    if listing and "error" in listing:
        lines.append(f"Folder listing ({listing['messages']:,} messages): FAILED: "
                     f"`{listing['error']}`")
    elif listing:
        lines += [f"Folder listing, inbox of {listing['messages']:,} messages, 50 per page, "
                  "through the HTTP API (300 requests each):", "",
                  "| page | p50 ms | p99 ms |", "|---|---:|---:|"]
        for name, value in listing.items():
            if isinstance(value, dict):
                lines.append(f"| {name} | {value['p50_ms']:.1f} | {value['p99_ms']:.1f} |")
    return "\n".join(lines)


def cpu_breakdown(report: dict[str, Any]) -> str:
    """Median over the good rounds of each process's CPU ms/msg, per peer and size."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in report.get("rounds_detail", []):
        if not r["error"]:
            groups.setdefault((r["size"], r["peer"]), []).append(r)
    lines = ["| size | peer | CPU ms/msg by process (median of rounds) |", "|---|---|---|"]
    for (size, peer), rounds in sorted(groups.items(), key=lambda kv: (kv[0][0],
                                                                        kv[0][1] != "postfix")):
        names = {name for r in rounds for name in r.get("cpu_by_process", {})}
        per: dict[str, float] = {}
        for name in names:
            values = sorted(r.get("cpu_by_process", {}).get(name, 0.0) * 1000 / r["messages"]
                            for r in rounds)
            per[name] = values[len(values) // 2]
        shown = ", ".join(f"{name.removeprefix('mailgrid serve ')} {ms:.2f}"
                          for name, ms in sorted(per.items(), key=lambda kv: -kv[1])
                          if ms >= 0.05)
        lines.append(f"| {size // 1024} KB | {peer} | {shown} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    return "\n\n".join([
        "### Side by side", results_table(report),
        "### Every round", rounds_table(report),
        "### Machine", machine_table(report),
        "### Idle memory and folder listing", listing_and_idle(report),
        "### CPU by process", cpu_breakdown(report)]) + "\n"
