"""gateway.webmail.sanitize: what mail HTML keeps on its way to the reading frame."""

from __future__ import annotations

from gateway.webmail import sanitize

PIXEL = "data:image/png;base64,iVBORw0KGgo="


def test_script_style_and_event_handlers_are_removed_with_their_content() -> None:
    safe = sanitize('<p onclick="alert(1)">hi</p><script>alert(2)</script>'
                    "<style>p{background:url(http://x/)}</style>")
    assert safe.html == "<p>hi</p>"


def test_svg_iframe_object_form_and_meta_refresh_are_dropped() -> None:
    safe = sanitize('<svg onload="alert(1)"><image href="http://x/a"/></svg>'
                    '<iframe src="http://x/f"></iframe><object data="http://x/o"></object>'
                    '<form action="http://x/"><input name="q"></form>'
                    '<meta http-equiv="refresh" content="0;url=http://x/">text')
    assert "http://x" not in safe.html
    assert "<svg" not in safe.html and "<iframe" not in safe.html
    assert safe.html.endswith("text")


def test_javascript_and_data_links_lose_their_target() -> None:
    safe = sanitize('<a href="javascript:alert(1)">a</a><a href="data:text/html,x">b</a>'
                    '<a href="https://example.org/">c</a>')
    assert "javascript" not in safe.html and "data:text" not in safe.html
    assert '<a href="https://example.org/" rel="noopener noreferrer">c</a>' in safe.html


def test_remote_images_are_blocked_and_counted_until_asked_for() -> None:
    html = f'<img src="https://tracker.example/p.gif"><img src="//t.example/q"><img src="{PIXEL}">'
    blocked = sanitize(html)
    assert blocked.blocked_images == 1
    assert "tracker" not in blocked.html and "t.example" not in blocked.html
    assert PIXEL in blocked.html
    shown = sanitize(html, remote_images=True)
    assert shown.blocked_images == 0
    assert 'src="https://tracker.example/p.gif"' in shown.html
    # Scheme-relative counts as relative: dropped even then.
    assert "t.example" not in shown.html


def test_css_that_could_fetch_is_dropped_and_plain_styling_kept() -> None:
    safe = sanitize('<p style="color: red; background-image: url(http://x/b.png)">t</p>')
    assert safe.html == '<p style="color:red">t</p>'


def test_relative_urls_are_dropped_they_would_reach_our_own_origin() -> None:
    safe = sanitize('<img src="x"><a href="/v1/folders">f</a><img src="../v1/me">',
                    remote_images=True)
    assert "src" not in safe.html and "href" not in safe.html
