"""Passwords kept out of everything shown: URLs redacted, driver messages and free text scrubbed.

Every URL shown to a person goes through :func:`redact_url`; every driver error that reaches a
message goes through :func:`scrub`. This module sits at the bottom, so settings, connections and
records can all use it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus, unquote

if TYPE_CHECKING:
    from sqlalchemy.engine import URL


def redact_url(url: str | URL) -> str:
    """The URL as it may be shown: the password replaced by ``***``, the query left readable."""
    # SQLAlchemy parses URLs; imported here so that reading settings (every command's start, `opslib run`
    # included, which never connects itself) does not pay 0.2 s for it.
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError

    if isinstance(url, str):
        try:
            url = sa.make_url(url)
        except (ArgumentError, ValueError):
            return "<unparseable URL>"
    if not url.password:
        url = url._replace(password=None)  # "user:@" (an empty password) shows as plain "user@"
    # Unquoted so a socket path reads as ?host=/path; the password is already masked.
    return unquote(url.render_as_string(hide_password=True))


def scrub(text: str, url: URL | None) -> str:
    """Remove the URL's password from ``text`` wherever it appears, raw or percent-encoded."""
    if url is not None and url.password:
        text = _without(text, str(url.password))
    return text


def scrub_password(text: str, url: str) -> str:
    """Remove the password of ``url`` (a URL string) from ``text``, raw or percent-encoded."""
    match = re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*:([^\s/@]+)@", url)
    if not match:
        return text
    return _without(_without(text, match.group(1)), unquote(match.group(1)))


def _without(text: str, secret: str) -> str:
    # A password shows as written, decoded (%40 as @) or encoded again (an error quoting a URL).
    for form in sorted({secret, unquote(secret), quote(secret, safe=""), quote_plus(secret)}, key=len, reverse=True):
        if form:
            text = text.replace(form, "***")
    return text


# scheme://user:password@ in free text (an error message, a notebook output): the password part.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@")


def redact_urls_in(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", text)
