"""The spam rules, DMARC record parsing and the Authentication-Results rendering."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery_svc.checks import InboundChecks, JobChecks, spam
from delivery_svc.checks.auth import (
    AuthResults,
    DkimResult,
    from_domains,
    header_names,
    parse_dmarc,
)
from gateway.http_api import message_out
from mailgrid.mime import parse_message
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2, metadata_pb2
from tests.e2e.mail import smtp_wire_form
from tests.e2e.test_corpus import corpus_messages

LOCAL = ["example.test", "example.org"]


def _org(domain: str) -> str:
    return ".".join(domain.split(".")[-2:])


def _score(raw: bytes, auth: AuthResults | None, mail_from: str = "peer@remote.test",
           lists: list[common_pb2.SenderListEntry] | None = None) -> common_pb2.SpamReport:
    parsed = parse_message(raw).message
    rules = spam.message_rules(parsed, set(header_names(raw)), auth, mail_from, LOCAL, _org)
    return spam.score(rules, getattr(parsed, "from").email, lists or [], 5.0)


def _unauthenticated(raw: bytes) -> AuthResults:
    """What the checks find for mail whose domains publish nothing (as in the e2e suite)."""
    domains = from_domains(raw)
    signed = b"\r\ndkim-signature:" in b"\r\n" + raw.lower()
    return AuthResults(spf="none", dkim=[DkimResult("permerror", "x.test", "s")]
                       if signed else [], dmarc="none",
                       from_domain=domains[0] if len(set(domains)) == 1 else "")


def test_no_corpus_message_is_spam_when_its_domains_publish_nothing() -> None:
    # The corpus round trip (tests/e2e/test_corpus.py) expects all of it in the inbox.
    for name, data in corpus_messages():
        raw = smtp_wire_form(data)
        report = _score(raw, _unauthenticated(raw))
        assert report.score < report.threshold, (name, report)


def test_each_rule_names_its_score_and_reason() -> None:
    raw = (b"From: IT <it@example.test>\r\nSubject: VERIFY YOUR ACCOUNT NOW PLEASE\r\n\r\n"
           b"Verify your account within 24 hours or it will be locked.\r\n")
    auth = AuthResults(spf="fail", spf_domain="evil.test", dmarc="fail",
                       dmarc_policy="reject", from_domain="example.test")
    report = _score(raw, auth, mail_from="x@evil.test")
    rules = {r.name: r.score for r in report.rules}
    assert rules == {"spf_fail": 3.0, "dmarc_fail": 2.0, "local_domain_forged": 3.0,
                     "missing_date": 0.5, "missing_message_id": 0.5,
                     "from_return_path_mismatch": 0.5, "subject_all_caps": 1.0,
                     "pattern_credential_phish": 2.5}
    assert report.score == 13.0
    assert all(r.detail for r in report.rules)


def test_allow_list_of_the_domain_outweighs_the_other_rules() -> None:
    raw = b"From: a@friend.test\r\nSubject: CHEAP VIAGRA FOR EVERYONE\r\n\r\nhi\r\n"
    entry = common_pb2.SenderListEntry(sender="friend.test", allow=True, source="user")
    report = _score(raw, None, mail_from="a@friend.test", lists=[entry])
    assert report.score < 0
    assert report.rules[-1].name == "sender_allow_list"


def test_each_recipient_gets_the_message_rules_once_worked_out_and_its_own_lists() -> None:
    raw = b"From: a@friend.test\r\nSubject: cheap viagra\r\n\r\nhi\r\n"
    parsed = parse_message(raw).message
    checks = JobChecks(auth=None, authentication_results="", header_names=set(header_names(raw)),
                       mail_from="a@friend.test", external=True)
    inbound = InboundChecks(Settings())
    blocked = common_pb2.SenderListEntry(sender="friend.test", allow=False, source="user")
    folder, first = inbound.decide(checks, parsed, [blocked])
    assert folder == "spam" and first.spam.rules[-1].name == "sender_block_list"
    # The second recipient's copy reuses the rules worked out for the first: a change to
    # the parsed message in between (never made in practice) shows they are not redone.
    parsed.subject = "A SUBJECT IN CAPITALS ONLY"
    folder, second = inbound.decide(checks, parsed, [])
    assert folder == "inbox"
    assert [r.name for r in second.spam.rules] == [r.name for r in first.spam.rules[:-1]]
    assert "pattern_pharma" in [r.name for r in second.spam.rules]
    assert "subject_all_caps" not in [r.name for r in second.spam.rules]


def test_an_address_entry_wins_over_its_domain_entry() -> None:
    entries = [common_pb2.SenderListEntry(sender="friend.test", allow=False),
               common_pb2.SenderListEntry(sender="boss@friend.test", allow=True)]
    found = spam.sender_verdict("Boss@Friend.test", entries)
    assert found is not None and found.allow


@pytest.mark.parametrize(("record", "expected"), [
    ("v=DMARC1; p=reject", ("reject", "reject", "r", "r")),
    ("v=DMARC1; p=quarantine; sp=none; adkim=s; aspf=s", ("quarantine", "none", "s", "s")),
    ("v=DMARC1;p=none;sp=bogus", ("none", "none", "r", "r")),
])
def test_dmarc_records_are_parsed(record: str, expected: tuple[str, ...]) -> None:
    parsed = parse_dmarc(record, "a.test")
    assert parsed is not None
    assert (parsed.policy, parsed.subdomain_policy, parsed.adkim, parsed.aspf) == expected


def test_dmarc_record_without_a_valid_policy_is_ignored() -> None:
    assert parse_dmarc("v=DMARC1; rua=mailto:x@a.test", "a.test") is None
    assert parse_dmarc("v=DMARC1; p=discard", "a.test") is None


def test_authentication_results_follow_rfc_8601() -> None:
    auth = AuthResults(spf="pass", mail_from="b@a.test", spf_detail="ok (fine)",
                       dkim=[DkimResult("pass", "a.test", "sel"),
                             DkimResult("fail", "b.test", "s2", "bad")],
                       dmarc="pass", dmarc_policy="reject", from_domain="a.test")
    assert auth.header_value("mx.example.test").split(";\r\n\t") == [
        "mx.example.test", "spf=pass (ok fine) smtp.mailfrom=b@a.test",
        "dkim=pass header.d=a.test header.s=sel", "dkim=fail (bad) header.d=b.test header.s=s2",
        "dmarc=pass (p=reject) header.from=a.test"]
    null_sender = AuthResults(helo="mx.a.test")
    assert "spf=none smtp.helo=mx.a.test" in null_sender.header_value("mx")


def test_several_from_domains_are_all_found() -> None:
    raw = b"From: a@one.test, B <b@Two.test>\r\nSubject: x\r\n\r\n"
    assert from_domains(raw) == ["one.test", "two.test"]


def test_the_api_shows_the_checks_of_a_message() -> None:
    message = common_pb2.Message(email_id="e", checks=common_pb2.InboundVerdict(
        authentication_results="mx; spf=none", reason="spam score 6 >= 5",
        spam=common_pb2.SpamReport(score=6, threshold=5, rules=[
            common_pb2.SpamRule(name="spf_fail", score=3, detail="no")])))
    out = message_out(message).model_dump(by_alias=True)
    assert out["authentication_results"] == "mx; spf=none"
    assert out["spam"] == {"score": 6.0, "threshold": 5.0,
                           "rules": [{"name": "spf_fail", "score": 3.0, "detail": "no"}]}
    assert out["filing_reason"] == "spam score 6 >= 5" and out["virus"] is None
    plain = message_out(common_pb2.Message(email_id="f")).model_dump()
    assert plain["spam"] is None and plain["authentication_results"] is None


SPAM_PHRASES = {
    "lottery": "You have WON the national LOTTERY",
    "advance_fee": "as the Beneficiary of 5 MILLION usd",
    "pharma": "Cheap Meds here",
    "crypto_doubler": "Double Your Bitcoin today",
    "credential_phish": "VERIFY YOUR PASSWORD or be locked",
}


@pytest.mark.parametrize("name", [name for name, _, _ in spam.BAD_PATTERNS])
def test_each_spam_phrase_matches_in_any_case_despite_the_word_prefilter(name: str) -> None:
    for phrase in (SPAM_PHRASES[name], SPAM_PHRASES[name].upper(),
                   SPAM_PHRASES[name].lower()):
        raw = f"From: a@b.test\r\nSubject: hello\r\n\r\n{phrase}\r\n".encode()
        rules = {r.name for r in _score(raw, None).rules}
        assert f"pattern_{name}" in rules, phrase


def test_the_letters_looked_for_first_are_letters_of_each_word() -> None:
    """A text holding a word holds its letters: the memchr test drops no word."""
    for _, words, _ in spam.BAD_PATTERNS:
        for word in words:
            letters = spam._RARE_LETTERS[word]
            assert len(set(letters)) == 2 and set(letters) <= set(word), word


@pytest.mark.parametrize("filler", ["1" + "X" * 77 + "\r\n",
                                    "Привет, как дела? Всё хорошо.\r\n",
                                    "plain english words in a line\r\n"])
@pytest.mark.parametrize("name", [name for name, _, _ in spam.BAD_PATTERNS])
def test_a_spam_phrase_in_a_long_body_is_found_whatever_the_text_around_it(
        name: str, filler: str) -> None:
    body = filler * 100 + SPAM_PHRASES[name] + "\r\n" + filler * 100
    raw = f"From: a@b.test\r\nSubject: hello\r\n\r\n{body}".encode()
    assert f"pattern_{name}" in {r.name for r in _score(raw, None).rules}
    plain = f"From: a@b.test\r\nSubject: hello\r\n\r\n{filler * 200}".encode()
    assert not [r for r in _score(plain, None).rules if r.name.startswith("pattern_")]


def _searched_everywhere(parsed: metadata_pb2.ParsedMessage) -> list[spam.Rule]:
    """The pattern rules as a plain search of the whole text finds them: no prefilter,
    no anchoring at the words."""
    text = f"{parsed.subject}\n{parsed.text[:20000]}"
    rules: list[spam.Rule] = []
    for name, _, pattern in spam.BAD_PATTERNS:
        if sum(r.score for r in rules) >= spam.PATTERN_CAP:
            break
        if found := pattern.search(text):
            rules.append(spam.Rule(f"pattern_{name}", spam.PATTERN_SCORE,
                                   f"matches a known spam phrase: {found.group(0)[:60]!r}"))
    return rules


# Pieces that make and unmake the phrases: each phrase, its words in other cases and in
# longer words ("won't", "swon"), near misses, characters that fold to a letter (the
# Kelvin sign, the long s) or to two ("ß"), and filler of several kinds.
_PIECES = [*SPAM_PHRASES.values(), "you", "You've", "YOU HAVE", " won", "won't", "swon",
           "wonder", "Won", " the ", "lottery", "prize", "jackpot", "beneficiary", "next of",
           " kin", "\u212aIN", "million", "$", "usd", "viagra", "CIALIS", "cheap", " meds",
           "double your", "triple", " your ", "bitcoin", "crypto", "verify", "account",
           "password", "locked", "suspend", "within 24 hours", "\u017f", "ß", "\n", " ", "_",
           "1XXXXXXXXX\r\n", "Привет ", "plain words "]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=40),
       st.lists(st.sampled_from(_PIECES), max_size=4))
def test_the_pattern_rules_are_those_a_search_of_the_whole_text_finds(
        pieces: list[str], subject: list[str]) -> None:
    """Trying each pattern only where its words occur finds the same matches, with the
    same text, as searching all of the message."""
    parsed = metadata_pb2.ParsedMessage(subject="".join(subject), text="".join(pieces))
    assert spam._pattern_rules(parsed) == _searched_everywhere(parsed)


def test_a_common_word_of_a_phrase_in_long_english_text_is_tried_where_it_occurs() -> None:
    """ "won" of "won't" in every line, and the lottery phrase near the end: found, with
    the same text as a search of the whole body finds."""
    line = "We won't make it on Tuesday, but the figures look reasonable to us.\n"
    parsed = metadata_pb2.ParsedMessage(
        subject="minutes", text=line * 250 + "Yes, you have won the grand prize!\n" + line)
    rules = spam._pattern_rules(parsed)
    assert [r.name for r in rules] == ["pattern_lottery"]
    assert rules == _searched_everywhere(parsed)
    assert "won the grand prize" in rules[0].detail
