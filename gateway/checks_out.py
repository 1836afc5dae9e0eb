"""What the inbound checks found, as GET /v1/messages/{id} shows it.

    "authentication_results": "mx.example.test; spf=pass smtp.mailfrom=...; dkim=...",
    "spam": {"score": 1.5, "threshold": 5.0,
             "rules": [{"name": "missing_date", "score": 0.5, "detail": "..."}]},
    "filing_reason": "DMARC policy p=reject of bank.test: ...",   # why not the inbox
    "virus": "Eicar-Test-Signature"

All four are null for mail that did not go through the checks (e.g. Sent copies).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mailgrid.v1 import common_pb2


class SpamRuleOut(BaseModel):
    name: str
    score: float
    detail: str


class SpamOut(BaseModel):
    score: float
    threshold: float
    rules: list[SpamRuleOut]


def checks_fields(m: common_pb2.Message) -> dict[str, Any]:
    if not m.HasField("checks"):
        return {"authentication_results": None, "spam": None, "filing_reason": None,
                "virus": None}
    c = m.checks
    spam = None
    if c.HasField("spam"):
        spam = {"score": c.spam.score, "threshold": c.spam.threshold,
                "rules": [{"name": r.name, "score": r.score, "detail": r.detail}
                          for r in c.spam.rules]}
    return {"authentication_results": c.authentication_results or None, "spam": spam,
            "filing_reason": c.reason or None, "virus": c.virus or None}
