"""Snippets: the piece of a body around the first match, with the matching words marked.

One implementation for every adapter, so a result looks the same whatever the backend.
Words are compared as the indexes compare them: runs of letters and digits, lower-cased,
accents removed; a prefix term (``pay*``) marks every word that starts with it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from search_svc import query as q
from search_svc.ports import Highlight

WORD = re.compile(r"[^\W_]+")
SNIPPET_CHARS = 160
# Only the start of a long body is looked at for a snippet.
SCAN_CHARS = 64 * 1024


def fold(word: str) -> str:
    decomposed = unicodedata.normalize("NFKD", word.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def words_of(text: str) -> list[str]:
    return [fold(w) for w in WORD.findall(text)]


def highlight_terms(node: q.Node) -> tuple[set[str], tuple[str, ...]]:
    """The whole words and the prefixes to mark: the words of every Text node of the
    body's fields that is not under a NOT."""
    exact: set[str] = set()
    prefixes: list[str] = []
    for text in _positive_text(node):
        if text.field is not None:
            continue
        words = words_of(text.text)
        if text.prefix and words:
            prefixes.append(words.pop())
        exact.update(words)
    return exact, tuple(prefixes)


def _positive_text(node: q.Node) -> Iterable[q.Text]:
    if isinstance(node, q.Text):
        yield node
    elif isinstance(node, q.And | q.Or):
        for item in node.items:
            yield from _positive_text(item)


def snippet(body: str, fallback: str, terms: tuple[set[str], tuple[str, ...]]
            ) -> tuple[str, tuple[Highlight, ...]]:
    """About SNIPPET_CHARS of ``body`` starting near its first marked word, and the
    marked spans; ``fallback`` (the preview) unmarked when no word of the body matches."""
    exact, prefixes = terms
    if not exact and not prefixes:
        return fallback, ()
    text = body[:SCAN_CHARS]
    spans = [(m.start(), m.end()) for m in WORD.finditer(text)
             if _marked(fold(m.group()), exact, prefixes)]
    if not spans:
        return fallback, ()
    first = spans[0][0]
    start = _word_start(text, max(0, first - SNIPPET_CHARS // 4))
    end = min(len(text), start + SNIPPET_CHARS)
    piece = text[start:end]
    # Whitespace runs (line breaks of the body) become one space, spans follow.
    out: list[str] = []
    mapping: list[int] = []
    for ch in piece:
        if ch.isspace():
            if out and out[-1] == " ":
                mapping.append(len(out) - 1)
                continue
            ch = " "
        mapping.append(len(out))
        out.append(ch)
    mapping.append(len(out))
    marked = tuple(Highlight(mapping[s - start], mapping[e - start])
                   for s, e in spans if s >= start and e <= end)
    return _strip(out, marked)


def _strip(out: list[str], marked: tuple[Highlight, ...]) -> tuple[str, tuple[Highlight, ...]]:
    text = "".join(out)
    lead = len(text) - len(text.lstrip())
    shifted = tuple(Highlight(h.start - lead, h.end - lead) for h in marked)
    return text.strip(), shifted


def _marked(word: str, exact: set[str], prefixes: tuple[str, ...]) -> bool:
    return word in exact or any(word.startswith(p) for p in prefixes)


def _word_start(text: str, index: int) -> int:
    """``index`` moved forward to the start of a word (never cut one in half)."""
    if index == 0:
        return 0
    while index < len(text) and text[index - 1].isalnum():
        index += 1
    return index
