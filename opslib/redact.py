"""Passwords kept out of everything shown: URLs redacted, driver messages and free text scrubbed.

Every URL shown to a person goes through :func:`redact_url`; every driver error that reaches a
message goes through :func:`scrub`. This module sits at the bottom, so settings, connections and
records can all use it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, quote_plus, unquote, urlsplit

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
    if "password" in url.query:  # libpq also takes the password as a query parameter
        url = url.update_query_dict({"password": "***"})
    # Unquoted so a socket path reads as ?host=/path; the passwords are already masked.
    return unquote(url.render_as_string(hide_password=True))


def scrub(text: str, url: URL | str | None) -> str:
    """Remove the password of ``url`` (a SQLAlchemy URL or a URL string) from ``text`` wherever it
    appears, raw or percent-encoded: the one in ``user:password@`` and a ``?password=`` query value."""
    for secret in _passwords(url):
        text = _without(text, secret)
    return text


def scrub_password(text: str, url: str) -> str:
    """Remove the password of ``url`` (a URL string) from ``text``, raw or percent-encoded (:func:`scrub`)."""
    return scrub(text, url)


def _passwords(url: URL | str | None) -> list[str]:
    """The passwords a URL carries: in its user part and in its query (``?password=``, as libpq takes)."""
    if url is None:
        return []
    if isinstance(url, str):
        try:
            parts = urlsplit(url)
            found = [parts.password] if parts.password else []
        except ValueError:  # not a URL (a bad port, say): nothing can be taken from it
            return []
        return found + [v for v in parse_qs(parts.query).get("password", []) if v]
    found = [str(url.password)] if url.password else []
    query = url.query.get("password")
    return found + [v for v in ((query,) if isinstance(query, str) else query or ()) if v]


def _without(text: str, secret: str) -> str:
    # A password shows as written, decoded (%40 as @) or encoded again (an error quoting a URL).
    for form in sorted({secret, unquote(secret), quote(secret, safe=""), quote_plus(secret)}, key=len, reverse=True):
        if form:
            text = text.replace(form, "***")
    return text


# scheme://user:password@ in free text (an error message, a notebook output): the password part.
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]*:)[^\s/@]+@")
# password=... as a URL query parameter (?password=, &password=) or a libpq conninfo keyword
# (host=h password=x, quoted or not): the value.
_KEYWORD_PASSWORD = re.compile(r"""((?:^|[?&;\s])password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'"]+)""", re.IGNORECASE)


def redact_urls_in(text: str) -> str:
    """``text`` with every password shown in it replaced by ``***``: that of each
    ``scheme://user:password@host`` URL, and each ``password=`` in a URL's query or a libpq conninfo."""
    return _KEYWORD_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def scrub_json(value: Any, database_url: str | None = None, keep: frozenset[str] = frozenset()) -> Any:
    """A copy of a JSON value (an executed notebook, say) with every string value in it passed through
    :func:`redact_urls_in` and, given ``database_url``, :func:`scrub`; keys, and the values of the keys
    in ``keep`` (a notebook's ``cell_type``, ``output_type``…), are left as they are.

    Only text is changed, never the structure: replacing a short password in the raw JSON would also
    replace it inside keys and syntax (a password ``e`` in ``"cell_type"``) and break the file. Inside
    text, a very short password is still replaced wherever it appears, as in any message.
    """
    if isinstance(value, str):
        clean = redact_urls_in(value)
        return scrub(clean, database_url) if database_url else clean
    if isinstance(value, list):
        return [scrub_json(v, database_url, keep) for v in value]
    if isinstance(value, dict):
        return {k: v if k in keep else scrub_json(v, database_url, keep) for k, v in value.items()}
    return value
