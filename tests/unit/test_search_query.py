"""The search query language on its own: search_svc.query, snippets, folder resolution."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mailgrid.v1 import common_pb2
from search_svc import snippets
from search_svc.query import (
    All,
    And,
    DateRange,
    Flag,
    In,
    Not,
    Or,
    QuerySyntaxError,
    SizeRange,
    Text,
    parse,
    required_text,
)
from search_svc.service import resolve_folders

NOW = datetime(2024, 3, 31, 15, 30, tzinfo=UTC)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def p(query: str) -> object:
    return parse(query, now=NOW)


# ---- words, phrases, prefixes --------------------------------------------------------

def test_free_words_must_all_match() -> None:
    assert p("hello world") == And((Text("hello", pos=0), Text("world", pos=6)))


def test_an_empty_or_blank_query_matches_everything() -> None:
    assert p("") == All()
    assert p("   \t ") == All()


def test_a_quoted_phrase_is_one_text_kept_as_typed() -> None:
    assert p('"Exact  Phrase"') == Text("Exact  Phrase", pos=1)


def test_a_quoted_star_is_no_prefix() -> None:
    assert p('"pay*"') == Text("pay*", pos=1)


def test_a_trailing_star_makes_a_prefix() -> None:
    assert p("pay*") == Text("pay", prefix=True, pos=0)
    assert p("subject:quart*") == Text("quart", "subject", prefix=True, pos=8)


def test_words_without_letters_or_digits_are_ignored() -> None:
    assert p("hello & *") == Text("hello", pos=0)
    assert p('"" hello') == Text("hello", pos=3)
    assert p("- hello") == Text("hello", pos=2)  # a lone dash is not a negation


def test_unicode_words_are_kept_as_typed() -> None:
    assert p("Grüße 東京") == And((Text("Grüße", pos=0), Text("東京", pos=6)))


def test_words_that_look_like_unknown_operators_are_plain_text() -> None:
    assert p("re:lunch") == Text("re:lunch", pos=0)
    assert p("https://example.test/x") == Text("https://example.test/x", pos=0)


def test_lowercase_or_and_are_words() -> None:
    assert p("this or that") == And((Text("this", pos=0), Text("or", pos=5),
                                     Text("that", pos=8)))


# ---- boolean structure ---------------------------------------------------------------

def test_or_binds_looser_than_juxtaposition() -> None:
    assert p("a b OR c") == Or((And((Text("a", pos=0), Text("b", pos=2))),
                                Text("c", pos=7)))


def test_explicit_and_is_the_same_as_juxtaposition() -> None:
    assert p("a AND b") == And((Text("a", pos=0), Text("b", pos=6)))


def test_parentheses_group() -> None:
    assert p("(a OR b) c") == And((Or((Text("a", pos=1), Text("b", pos=6))),
                                   Text("c", pos=9)))


def test_a_dash_negates_a_word_a_phrase_an_operator_or_a_group() -> None:
    assert p("-spam") == Not(Text("spam", pos=1))
    assert p('-"free money"') == Not(Text("free money", pos=2))
    assert p("-from:bob") == Not(Text("bob", "from", pos=6))
    assert p("-(a OR b)") == Not(Or((Text("a", pos=2), Text("b", pos=7))))
    assert p("--x") == Not(Not(Text("x", pos=2)))


def test_a_dash_inside_a_word_is_part_of_it() -> None:
    assert p("e-mail") == Text("e-mail", pos=0)


def test_or_with_an_empty_side_matches_everything() -> None:
    assert p("& OR a") == All()


def test_required_text_skips_or_and_not() -> None:
    tree = p('alpha "beta gamma" -delta (x OR y) from:z')
    assert [t.text for t in required_text(tree)] == ["alpha", "beta gamma", "z"]


# ---- operators -----------------------------------------------------------------------

@pytest.mark.parametrize("field", ["from", "to", "cc", "bcc", "subject", "filename"])
def test_text_operators_name_their_field(field: str) -> None:
    assert p(f"{field}:value") == Text("value", field, pos=len(field) + 1)


def test_operator_names_are_case_insensitive() -> None:
    assert p("FROM:Alice") == Text("Alice", "from", pos=5)
    assert p("Is:Unread") == Flag("unread", pos=3)


def test_an_operator_takes_a_quoted_phrase() -> None:
    assert p('subject:"team lunch"') == Text("team lunch", "subject", pos=9)


def test_an_operator_applies_to_a_group() -> None:
    assert p("from:(ann OR ben) x") == And((
        Or((Text("ann", "from", pos=6), Text("ben", "from", pos=13))), Text("x", pos=18)))
    assert p('to:(-"a b" c)') == And((Not(Text("a b", "to", pos=6)), Text("c", "to", pos=11)))


def test_addresses_stay_whole() -> None:
    assert p("from:alice@example.test") == Text("alice@example.test", "from", pos=5)


def test_flags() -> None:
    assert p("has:attachment") == Flag("attachment", pos=4)
    assert p("has:attachments") == Flag("attachment", pos=4)
    for name in ("unread", "read", "starred", "unstarred"):
        assert p(f"is:{name}") == Flag(name, pos=3)


def test_in_keeps_the_folder_name() -> None:
    assert p("in:Receipts") == In("Receipts", pos=3)
    assert p("in:anywhere") == In("anywhere", pos=3)


def test_after_includes_its_day_and_before_excludes_it() -> None:
    assert p("after:2024-02-29") == DateRange(lo=ms("2024-02-29T00:00:00"))
    assert p("before:2024-03-01") == DateRange(hi=ms("2024-03-01T00:00:00") - 1)
    assert p("after:2024/2/9") == DateRange(lo=ms("2024-02-09T00:00:00"))
    assert p("before:1700000000") == DateRange(hi=1_700_000_000_000 - 1)


def test_older_and_newer_than_meet_at_one_instant() -> None:
    cutoff = ms("2024-03-24T15:30:00")
    assert p("older_than:7d") == DateRange(hi=cutoff - 1)
    assert p("newer_than:7d") == DateRange(lo=cutoff)
    assert p("newer_than:1w") == DateRange(lo=cutoff)


def test_months_and_years_are_calendar_ones_clamped_to_month_ends() -> None:
    assert p("newer_than:1m") == DateRange(lo=ms("2024-02-29T15:30:00"))  # leap year
    assert p("newer_than:13M") == DateRange(lo=ms("2023-02-28T15:30:00"))
    assert p("older_than:1y") == DateRange(hi=ms("2023-03-31T15:30:00") - 1)


def test_sizes_are_strict_with_binary_units() -> None:
    assert p("larger:10K") == SizeRange(lo=10 * 1024 + 1)
    assert p("smaller:5M") == SizeRange(hi=5 * 1024 * 1024 - 1)
    assert p("larger:100") == SizeRange(lo=101)
    assert p("larger:2mb") == SizeRange(lo=2 * 1024 * 1024 + 1)
    assert p("smaller:1G") == SizeRange(hi=1024**3 - 1)


# ---- errors and their positions ------------------------------------------------------

@pytest.mark.parametrize(("query", "message", "position"), [
    ('hello "world', "unterminated quote", 6),
    ("a)", "unmatched ')'", 1),
    ("(a OR b", "'(' is never closed", 0),
    ("x (a", "'(' is never closed", 2),
    ("a OR", "expected a term", 4),
    ("OR a", "expected a term", 0),
    ("a OR OR b", "expected a term", 5),
    ("()", "expected a term before ')'", 1),
    ("from:", "from: needs a value", 5),
    ("-(", "expected a term", 2),
    ("has:pdf", "unknown has:pdf", 4),
    ("is:important", "unknown is:important", 3),
    ("in:", "in: needs a value", 3),
    ("before:yesterday", "expected a date like 2024-01-31", 7),
    ("after:2024-02-30", "'2024-02-30' is not a date", 6),
    ("older_than:7", "expected an age like 7d", 11),
    ("newer_than:3h", "expected an age like 7d", 11),
    ("larger:ten", "expected a size like 500", 7),
    ("smaller:-5", "expected a size like 500", 8),
    ("is:(read)", "is: takes a single value", 3),
    ('subject:"open', "unterminated quote", 8),
    ("-OR x", "'-' needs a term after it", 0),
])
def test_malformed_queries_say_what_and_where(query: str, message: str,
                                             position: int) -> None:
    with pytest.raises(QuerySyntaxError) as caught:
        p(query)
    assert caught.value.message.startswith(message), caught.value.message
    assert caught.value.position == position
    assert caught.value.detail.endswith(f" at position {position}")


def test_an_overlong_query_is_refused() -> None:
    with pytest.raises(QuerySyntaxError):
        p("a " * 1001)


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(QuerySyntaxError, match="too deeply nested"):
        p("(" * 40 + "a" + ")" * 40)


def test_an_age_too_far_back_is_an_error_not_a_crash() -> None:
    with pytest.raises(QuerySyntaxError, match="too far back"):
        p("older_than:999999y")


# ---- folders -------------------------------------------------------------------------

FOLDERS = [
    common_pb2.Folder(folder_id="f-in", name="Inbox", role=common_pb2.FOLDER_ROLE_INBOX),
    common_pb2.Folder(folder_id="f-tr", name="Trash", role=common_pb2.FOLDER_ROLE_TRASH),
    common_pb2.Folder(folder_id="f-sp", name="Spam", role=common_pb2.FOLDER_ROLE_SPAM),
    common_pb2.Folder(folder_id="f-rc", name="Receipts", role=common_pb2.FOLDER_ROLE_CUSTOM),
]


def test_a_search_naming_no_folder_leaves_trash_and_spam_out() -> None:
    hidden = Not(In("trash+spam", folder_ids=("f-tr", "f-sp")))
    assert resolve_folders(p("x"), FOLDERS) == And((Text("x", pos=0), hidden))
    assert resolve_folders(p(""), FOLDERS) == hidden


def test_in_resolves_roles_names_in_any_case_and_ids() -> None:
    assert resolve_folders(p("in:inbox"), FOLDERS) == In("inbox", 3, ("f-in",))
    assert resolve_folders(p("in:RECEIPTS"), FOLDERS) == In("RECEIPTS", 3, ("f-rc",))
    assert resolve_folders(p("in:f-tr"), FOLDERS) == In("f-tr", 3, ("f-tr",))
    assert resolve_folders(p("in:anywhere x"), FOLDERS) == And((All(), Text("x", pos=12)))


def test_an_unknown_folder_is_an_error_at_its_position() -> None:
    with pytest.raises(QuerySyntaxError, match=r"no folder named 'Nope' at position 5$"):
        resolve_folders(p("x in:Nope"), FOLDERS)


# ---- snippets ------------------------------------------------------------------------

def test_snippets_mark_words_whatever_their_case_and_accents() -> None:
    terms = snippets.highlight_terms(p("cafe PAY* -hidden from:ignored"))
    text, marks = snippets.snippet("Meet at the Café.\n\nPayment hidden ignored", "pre",
                                   terms)
    assert text == "Meet at the Café. Payment hidden ignored"
    assert [text[m.start:m.end] for m in marks] == ["Café", "Payment"]


def test_a_snippet_starts_near_the_first_match_on_a_word_boundary() -> None:
    body = "filler " * 100 + "needle in the haystack"
    text, marks = snippets.snippet(body, "pre", snippets.highlight_terms(p("needle")))
    assert text.startswith("filler") and "needle" in text
    assert [text[m.start:m.end] for m in marks] == ["needle"]


def test_without_a_body_match_the_snippet_is_the_preview() -> None:
    assert snippets.snippet("nothing", "the preview",
                            snippets.highlight_terms(p("absent"))) == ("the preview", ())
    assert snippets.snippet("nothing", "the preview",
                            snippets.highlight_terms(p("is:unread"))) == ("the preview", ())
