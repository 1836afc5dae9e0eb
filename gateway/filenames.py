"""Attachment file names made harmless before they reach a Content-Disposition header.

The name comes from a stranger's MIME headers. It must not pick a directory
(``../../etc/passwd``), hide its real extension (U+202E RIGHT-TO-LEFT OVERRIDE turns
``invoice\u202efdp.exe`` into "invoiceexe.pdf" on screen), smuggle a header or a NUL,
nor exceed what file systems accept (255 bytes on most).
"""

from __future__ import annotations

import unicodedata

# Characters kept in a name, at most (file systems take 255 bytes; UTF-8 needs <= 4).
MAX_CHARS = 120
FALLBACK = "attachment"


def safe_filename(name: str) -> str:
    """``name`` without path parts, control or format characters, cut to MAX_CHARS."""
    # Cc: controls (NUL, CR, LF...); Cf: format (bidi overrides, zero-width); Zl/Zp:
    # line and paragraph separators; Cs/Co/Cn: surrogates, private use, unassigned.
    kept = "".join(c for c in name if unicodedata.category(c) not in
                   ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
    kept = kept.replace("/", "_").replace("\\", "_")
    while ".." in kept:  # harmless without separators, but no name needs it
        kept = kept.replace("..", ".")
    kept = kept.strip(" .")
    if not kept:
        return FALLBACK
    if len(kept) > MAX_CHARS:
        stem, dot, ext = kept.rpartition(".")
        if dot and 0 < len(ext) <= 10:
            kept = stem[:MAX_CHARS - len(ext) - 1] + "." + ext
        else:
            kept = kept[:MAX_CHARS]
    return kept
