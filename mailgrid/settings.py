"""Typed settings, read from MAILGRID_* environment variables.

Every setting has a default that runs the whole suite on one machine; the one-line
comment above each says what it is for. Settings are passed into constructors, never
read from a global.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024

def split_host_port(addr: str) -> tuple[str, int]:
    """'127.0.0.1:2525' → ('127.0.0.1', 2525); '[::1]:25' → ('::1', 25)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


@functools.cache
def _fqdn() -> str:
    """This machine's name, looked up once: ``socket.getfqdn`` asks the resolver each
    time (a quarter millisecond), and the SMTP edge reads server_name per connection."""
    return socket.getfqdn()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAILGRID_", extra="ignore")

    # Where the embedded backends keep their files (SQLite, blobs, NATS store, secrets).
    data_dir: Path = Path(".mailgrid")
    # HTTP API, WebSocket and webmail listener.
    http_addr: str = "127.0.0.1:8025"
    # SMTP MX listener: mail from other servers to our users.
    smtp_addr: str = "127.0.0.1:2525"
    # SMTP submission listener (AUTH): mail from our users to anywhere.
    submission_addr: str = "127.0.0.1:2587"
    # PEM certificate (chain) and key for STARTTLS on the submission port; when unset, a
    # self-signed pair is generated on first run into data_dir/tls/.
    submission_tls_cert: str = ""
    submission_tls_key: str = ""
    # Allow AUTH without TLS on the submission port for clients on a loopback address.
    submission_auth_plaintext_loopback: bool = False
    # Failed AUTH attempts per client IP within the window before AUTH is refused (421).
    submission_auth_max_failures: int = 5
    # Seconds a failed AUTH attempt counts against its client IP.
    submission_auth_failure_window: float = 900.0
    # Domains we accept mail for; the first one names this host when hostname is unset.
    domains: Annotated[list[str], NoDecode] = ["example.test"]
    # Name used in the SMTP banner and in Received headers.
    hostname: str = ""
    # An existing NATS server; when empty, `mailgrid up` starts one under data_dir.
    # Several URLs of one cluster: nats://h1:4222,nats://h2:4222.
    nats_url: str = ""
    # Replicas of each JetStream stream (3 on a 3-node cluster; never lowered once set).
    nats_replicas: int = 1
    # Soft memory limit (Go's GOMEMLIMIT) of the nats-server `mailgrid up` starts, in
    # bytes; 0: Go's default, under which its heap grows round after round of a burst.
    nats_memory_limit: int = Field(default=192 * MiB, ge=0)
    # gRPC listener of metadata_svc; port 0 picks a free one (the launcher passes it on).
    metadata_addr: str = "127.0.0.1:0"
    # gRPC listener of delivery_svc.
    delivery_addr: str = "127.0.0.1:0"
    # gRPC listener of realtime_svc (live events); the gateway's WebSocket connects here.
    realtime_addr: str = "127.0.0.1:0"
    # Events buffered per live session; a client further behind is told to resync.
    realtime_session_buffer: int = 256
    # Seconds between heartbeats on an idle event stream (WebSocket and gRPC).
    events_heartbeat: float = 25.0
    # Origins allowed to open the events WebSocket (scheme://host[:port]); empty means
    # the same host as the HTTP listener, as the browser reached it (Host header).
    events_allowed_origins: Annotated[list[str], NoDecode] = []
    # gRPC listener of search_svc (full-text search; the gateway's /v1/search calls it).
    search_addr: str = "127.0.0.1:0"
    # Search index: embedded:// (tantivy in data_dir/search; embedded:///PATH elsewhere)
    # or meilisearch://HOST:PORT/INDEX?key=KEY (tls=1 for HTTPS).
    search_url: str = "embedded://"
    # Seconds a search asking for read-your-writes (min_applied_seq) waits for the index.
    search_wait_timeout: float = 5.0
    # Most mailbox events applied to the search index in one commit.
    search_batch: int = 256
    # Seconds the indexer waits for more events when a batch is short: fewer, fuller
    # index commits under load (search waits for what it must see by event sequence).
    search_linger: float = 0.1
    # CPU niceness (0-19) of `mailgrid serve search`: indexing is background work, so
    # when CPU is short, accepting and filing mail come first and the index catches up
    # after the burst (a search that must see a message waits for it by event sequence).
    search_nice: int = Field(default=10, ge=0, le=19)
    # CPU niceness (0-19) of `mailgrid serve delivery`: filing is a queue consumer, so
    # when CPU is short the SMTP sessions waiting for their 250 come first, and filing
    # takes what queued meanwhile in larger batches, which cost less per message
    # (docs/PERFORMANCE.md, item 32). Sending (SubmitMessage) runs there too and waits
    # as much, only while CPU is short.
    delivery_nice: int = Field(default=5, ge=0, le=19)
    # Longest, in seconds, a mailbox change waits to be indexed while the machine has
    # no CPU to spare (search_svc.pacing): mail is filed first, the index catches up
    # when there is room, and a search that must see a change has it indexed at once.
    # 0: index at once. At most 30, well within the indexer's 60 s ack wait. 20 s lets
    # a burst of that length be filed with both cores (docs/PERFORMANCE.md, item 31).
    search_index_max_delay: float = Field(default=20.0, ge=0, le=30)
    # Freed C heap (glibc) a service keeps for reuse, in bytes; 0: glibc's defaults,
    # which return large buffers to the OS at once, so that the next message faults
    # its pages in again (mailgrid.memory).
    malloc_keep_bytes: int = Field(default=128 * MiB, ge=0)
    # A service quiet for this many seconds in a row returns the heap it kept to the OS
    # (0: never), so memory a burst of mail needed goes back soon after the burst.
    malloc_return_interval: float = Field(default=10.0, ge=0)
    # gRPC listener of the gateway (health and reflection only).
    gateway_grpc_addr: str = "127.0.0.1:0"
    # Metadata database; sqlite:///PATH (default: data_dir/metadata.db) or
    # scylla://HOST[:PORT][,HOST...]/KEYSPACE[?dc=LOCAL_DC] (pip install 'mailgrid[scylla]').
    metadata_db_url: str = ""
    # ScyllaDB consistency level of reads and writes (LWTs use LOCAL_SERIAL).
    scylla_consistency: str = "LOCAL_QUORUM"
    # Replication of the keyspace `mailgrid migrate` creates: replication_factor=N or
    # DC=N,DC=N (NetworkTopologyStrategy).
    scylla_replication: str = "replication_factor=3"
    # Blob store; file:///PATH (default: data_dir/blobs) or
    # s3://ACCESS:SECRET@HOST:PORT/BUCKET?secure=false (MinIO or any S3; bucket created).
    blob_url: str = ""
    # Largest message accepted over SMTP, in bytes (advertised with SIZE).
    max_message_size: int = 25 * MiB
    # Longest line accepted in DATA, in bytes. RFC 5321 says 1000 but asks servers to
    # accept longer lines where they can, as Postfix does; this bounds memory instead.
    max_line_length: int = 32 * 1024
    # Most RCPT TO accepted in one transaction (RFC 5321 4.5.3.1.8 asks for at least 100).
    max_recipients: int = 100
    # More Received headers than this means a mail loop (RFC 5321 6.3).
    max_received_headers: int = 50
    # Seconds an SMTP client may stay silent (or drip a command) before 421 4.4.2 and
    # close (RFC 5321 4.5.3.2.7 asks for at least 5 minutes).
    smtp_idle_timeout: float = 300.0
    # Seconds a whole DATA transfer may take, however slowly it trickles in.
    smtp_data_timeout: float = 600.0
    # Error replies in one SMTP session before 421 4.7.0 and close (Postfix
    # smtpd_hard_error_limit).
    smtp_max_errors: int = 20
    # Simultaneous SMTP connections per client IP, per listener; more get 421 4.7.0.
    smtp_max_connections_per_ip: int = 20
    # MIME parsing limits: deeper or larger structures are kept raw, not parsed further.
    mime_max_depth: int = 50
    mime_max_parts: int = 1000
    # Inbound jobs are tried this many times before they go to the DEAD stream.
    inbound_max_deliver: int = 8
    # Largest text or HTML body kept per message, in bytes (the raw message keeps all).
    mime_max_body_bytes: int = 1 * MiB
    # Inbound worker tasks per delivery_svc process (each files one batch at a time).
    inbound_workers: int = 2
    # Jobs an inbound worker fetches and files together (one StoreDeliveries call, one
    # durable commit for the batch).
    inbound_batch: int = 64
    # Messages up to this many bytes travel inside their INBOUND job (one durable publish
    # before 250, no blob round trip); larger ones go to the blob store first. Capped by
    # the NATS server's max_payload.
    inbound_inline_max_bytes: int = 512 * 1024
    # Seconds before a temporarily failed inbound job is retried; doubles per attempt.
    inbound_retry_delay: float = 2.0
    # Longest wait between retries of an inbound job, in seconds.
    inbound_retry_max_delay: float = 300.0
    # Seconds a worker may hold a job without acking before NATS redelivers it.
    inbound_ack_wait: float = 60.0
    # SPF/DKIM/DMARC checks of mail from the MX (DNS via outbound_nameserver).
    inbound_auth_checks: bool = True
    # Spam score at or above which inbound mail is filed in Spam.
    spam_threshold: float = 5.0
    # clamd to scan inbound mail with: a unix socket path or HOST:PORT; empty: no scan.
    clamd_address: str = ""
    # Secret that signs access tokens; generated into data_dir when empty.
    token_secret: str = ""
    # Lifetime of an access token, in seconds.
    token_ttl: int = 3600
    # Failed HTTP logins per client IP, and per address, within the window before
    # POST /v1/auth/token answers 429 (0: no limit).
    login_max_failures: int = 10
    # Seconds a failed HTTP login counts against its client IP and address.
    login_failure_window: float = 300.0
    # Seconds an unreferenced blob is kept before it is deleted: in-flight deliveries may
    # still reference it, and a queued remote message may be held only by its OUTBOUND
    # job, so keep this above outbound_max_lifetime.
    blob_gc_grace: float = 6 * 24 * 3600.0
    # Seconds between blob garbage-collection sweeps; 0 turns sweeps off in this instance.
    blob_gc_interval: float = 300.0
    # Outbound worker tasks per delivery_svc process: each holds one SMTP connection.
    outbound_workers: int = 4
    # DNS server for MX lookups as HOST:PORT; empty uses the system's resolver.
    outbound_nameserver: str = ""
    # Static routes that skip MX lookup: "domain=host:port,..." ("*" matches any domain).
    outbound_routes: str = ""
    # TCP port of the mail exchangers found by MX lookup (RFC 5321: 25).
    outbound_port: int = 25
    # STARTTLS policy (Postfix smtp_tls_security_level): none, may (when offered,
    # certificate not checked), encrypt (TLS required), verify (TLS with a valid certificate).
    outbound_tls: Literal["none", "may", "encrypt", "verify"] = "may"
    # Seconds before the first retry of a temporarily failed delivery; doubles per attempt.
    outbound_retry_delay: float = 300.0
    # Longest wait between delivery attempts, in seconds (Postfix maximal_backoff_time).
    outbound_retry_max_delay: float = 4000.0
    # Seconds a message may stay queued before it is returned to its sender (5 days).
    outbound_max_lifetime: float = 5 * 24 * 3600.0
    # Seconds queued after which the sender gets one "delayed" notice; 0 sends none.
    outbound_delay_warning: float = 0.0
    # Seconds to connect, and to wait for each SMTP reply, of a remote server.
    outbound_connect_timeout: float = 30.0
    outbound_command_timeout: float = 300.0
    # Seconds a worker may hold a job without acking before NATS redelivers it.
    outbound_ack_wait: float = 60.0
    # DKIM selector for the keys in data_dir/dkim/<domain>.key (a file
    # <selector>._domainkey.<domain>.key there overrides it for that domain).
    dkim_selector: str = "mail"
    # Python logging level for every service.
    log_level: str = "INFO"

    @field_validator("domains", mode="before")
    @classmethod
    def _split_domains(cls, value: object) -> object:
        if isinstance(value, str):
            return [d.strip().lower() for d in value.split(",") if d.strip()]
        return value

    @field_validator("events_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip().rstrip("/").lower() for o in value.split(",") if o.strip()]
        return value

    @field_validator("domains")
    @classmethod
    def _need_a_domain(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one local domain is required")
        return [d.lower() for d in value]

    @property
    def server_name(self) -> str:
        if self.hostname:
            return self.hostname
        fqdn = _fqdn()
        return fqdn if "." in fqdn and not fqdn.startswith("localhost") else f"mx.{self.domains[0]}"

    @property
    def metadata_db_path(self) -> Path:
        return _path_from_url(self.metadata_db_url, "sqlite", self.data_dir / "metadata.db")

    @property
    def blob_dir(self) -> Path:
        return _path_from_url(self.blob_url, "file", self.data_dir / "blobs")

    @property
    def nats_dir(self) -> Path:
        return self.data_dir / "nats"

    @property
    def dkim_dir(self) -> Path:
        return self.data_dir / "dkim"

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.domains

def _path_from_url(url: str, scheme: str, default: Path) -> Path:
    if not url:
        return default
    prefix = f"{scheme}://"
    if not url.startswith(prefix):
        raise ValueError(f"unsupported URL {url!r}: expected {prefix}PATH")
    return Path(url.removeprefix(prefix))

