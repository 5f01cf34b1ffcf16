"""Passwords kept out of everything shown: URLs redacted, driver messages and free text scrubbed.

Every URL shown to a person goes through :func:`redact_url`; every driver error that reaches a
message goes through :func:`scrub`; free text that may quote a URL or a libpq conninfo (a report
page, a notebook output) goes through :func:`redact_urls_in`, and a notebook's JSON through
:func:`scrub_json`. This module sits at the bottom, so settings, connections and records can all use it.

A URL carries a password in two places: its user part (``postgresql://user:pw@host/db``) and its
query (``postgresql://user@host/db?password=pw``, as libpq and psycopg2 take it); ``sslpassword``
(the client key's passphrase) is treated the same. Both are handled everywhere below.
"""

from __future__ import annotations

import io
import json
import re
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, quote_plus, unquote, urlsplit

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

# The query parameters (and libpq conninfo keywords) whose value is a secret.
_SECRET_KEYS = ("password", "sslpassword")


def redact_url(url: str | URL) -> str:
    """The URL as it may be shown: the password replaced by ``***``, in the user part and in a
    ``?password=`` query value, the rest of the query left readable."""
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
    masked = {key: "***" for key in _SECRET_KEYS if key in url.query}  # libpq also takes ?password=
    if masked:
        url = url.update_query_dict(masked)
    # Unquoted so a socket path reads as ?host=/path; the passwords are already masked.
    return unquote(url.render_as_string(hide_password=True))


def scrub(text: str, url: URL | str | None) -> str:
    """Remove the passwords of ``url`` (a SQLAlchemy URL or a URL string) from ``text`` wherever they
    appear, raw or percent-encoded: the one in ``user:password@`` and a ``?password=`` query value.

    The one implementation; :func:`scrub_password` is the same for a URL string. A very short password
    (``a``, ``1``) is replaced wherever that substring appears in ``text``: right for a message, wrong
    for structured text such as a notebook's JSON, which goes through :func:`scrub_json` instead.
    """
    for secret in _passwords(url):
        text = _without(text, secret)
    return text


def scrub_password(text: str, url: str) -> str:
    """:func:`scrub` for a URL given as a string (the database URL of settings or the environment)."""
    return scrub(text, url)


def _passwords(url: URL | str | None) -> list[str]:
    """The passwords a URL carries: in its user part and in its query (``?password=``, as libpq takes).

    A string is read both as SQLAlchemy reads it (what the connection uses: ``user:a/b@host`` has the
    password ``a/b``) and as :func:`urllib.parse.urlsplit` does (as libpq and most messages see it), so
    that whichever way a message shows the URL, its password is found.
    """
    if url is None:
        return []
    found: list[str] = []
    if isinstance(url, str):
        import sqlalchemy as sa  # late, as in redact_url
        from sqlalchemy.exc import ArgumentError

        try:
            found += _sqlalchemy_passwords(sa.make_url(url.strip()))
        except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads: urlsplit may still find one
            pass
        try:
            parts = urlsplit(url.strip())
            found += [parts.password or ""]
        except ValueError:  # not a URL (a bad IPv6 host, say): nothing more can be taken from it
            pass
        else:
            query = parse_qs(parts.query)
            found += [v for key in _SECRET_KEYS for v in query.get(key, [])]
    else:
        found += _sqlalchemy_passwords(url)
    return list(dict.fromkeys(v for v in found if v))


def _sqlalchemy_passwords(url: URL) -> list[str]:
    found = [str(url.password)] if url.password else []
    for key in _SECRET_KEYS:
        value = url.query.get(key)
        found += (value,) if isinstance(value, str) else value or ()
    return found


def _forms(secret: str) -> set[str]:
    """Every way a password shows in text: as written, decoded (%40 as @), encoded once or twice (a URL
    quoted in an error, a URL inside a URL's query), with ``+`` for spaces, and escaped as a libpq
    conninfo value (``password='it\\'s'``)."""
    forms = {secret, unquote(secret)}
    for plain in list(forms):
        once = quote(plain, safe="")
        forms |= {once, quote(once, safe=""), quote_plus(plain), quote(plain), plain.replace("\\", "\\\\").replace("'", "\\'")}
        forms |= {json.dumps(plain)[1:-1], json.dumps(plain, ensure_ascii=False)[1:-1]}  # as JSON output shows it
    return {form for form in forms if form}


# In what opslib writes on its own (records, manifests, its output), a remembered password shorter than this
# is removed only where the text shows it as a password (a URL's user part, a password= value): replaced
# wherever it appears, "a1" or "1" would corrupt revision ids, numbers and JSON. (A driver message or a
# notebook scrubbed for its own URL, :func:`scrub` and :func:`scrub_json`, loses any length.)
MIN_LITERAL = 4


def _without(text: str, secret: str, shortest: int = 1) -> str:
    if len(secret) < shortest:
        return text
    for form in sorted(_forms(secret), key=len, reverse=True):  # longest first: a form may contain another
        text = text.replace(form, "***")
    return text


# The passwords of every target URL this process resolved (settings, a fleet's targets, a runbook's
# database_url_env): what :func:`clean` removes from everything opslib writes, whatever the field.
_KNOWN: set[str] = set()


def remember_secrets(url: URL | str | None) -> None:
    """Note the passwords ``url`` carries (in its user part and ``?password=``), for :func:`clean`."""
    _KNOWN.update(_passwords(url))


def clean(text: str) -> str:
    """The one sink: ``text`` as opslib may write it anywhere (a record's field, a manifest, a report
    page, stdout and stderr): every URL- or conninfo-shaped password masked (:func:`redact_urls_in`),
    and every password of :func:`remember_secrets` removed in each of its forms, wherever it appears."""
    text = redact_urls_in(text)
    for secret in _KNOWN:
        text = _without(text, secret, MIN_LITERAL)
    return text


def clean_json(value: Any, free_text: frozenset[str], keep: frozenset[str] = frozenset()) -> Any:
    """A copy of a JSON value for writing (a sidecar, a manifest): every string masked by shape (as
    :func:`redact_urls_in`), and the strings under the keys in ``free_text`` (an error, a migration's
    output, a label: text that may quote anything) also through :func:`clean`, except the values under
    ``keep`` inside them (names, statuses). Structured fields (ids, names, revisions, digests) are never
    searched for the literal password, which may be a common word: so they stay as readers expect."""
    return _scrub_tree(value, sorted(_KNOWN), keep, False, free_text, MIN_LITERAL)


class CleanStream(io.TextIOBase):
    """A text stream whose every line goes through :func:`clean` on its way to ``stream``: the CLI's
    stdout and stderr, so that nothing it prints (an error, `-v` migration output, a traceback, JSON)
    can carry a password. Text is passed on at each line end (``\n`` or ``\r``) and on flush."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        cut = max(self._pending.rfind("\n"), self._pending.rfind("\r"))
        if cut >= 0:
            done, self._pending = self._pending[: cut + 1], self._pending[cut + 1 :]
            self._stream.write(clean(done))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            done, self._pending = self._pending, ""
            self._stream.write(clean(done))
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


# scheme://user:password@ in free text (an error message, a notebook output, a report page): the
# password part, up to the last @ before a space, so that a password shown decoded (p@ss/w?rd) is
# masked whole; an @ later in the same word (a query's e-mail) only hides more. It stops at quotes
# and angle brackets, so HTML stays HTML.
_URL_PASSWORD = re.compile(r"""(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@<>"']*:)[^\s<>"']+@""")
# password=... as a URL query parameter (?password=, &password=, &amp;password= in HTML) or a libpq
# conninfo keyword (host=h password=x, quoted or not): the value. sslpassword likewise.
_KEYWORD_PASSWORD = re.compile(
    r"""((?:^|[?&;,(>"'\s])(?:ssl)?password\s*=\s*)"""
    r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&'"<=][^\s&'"<]*)""",
    re.IGNORECASE,
)


def redact_urls_in(text: str) -> str:
    """``text`` with every password shown in it replaced by ``***``: that of each
    ``scheme://user:password@host`` URL, each ``password=`` in a URL's query (raw or percent-encoded
    alike: the whole value goes), and each ``password=`` of a libpq conninfo (``host=h password=x``).

    It needs no URL: it goes by the text's shape, so it never touches words that merely equal a password.
    """
    return _KEYWORD_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


# A notebook's structural strings (nbformat's enumerations, ids and names, the kernel and language
# details nbconvert reads, papermill's tags and status): never scrubbed for the literal password,
# whatever it is, so that nbformat and nbconvert still read the notebook.
NOTEBOOK_STRUCTURE = frozenset(
    {"cell_type", "output_type", "name", "id", "mimetype", "language", "file_extension", "pygments_lexer",
     "nbconvert_exporter", "display_name", "version", "codemirror_mode", "scrolled", "format", "tags",
     "status"}
)  # fmt: skip


def scrub_json(
    value: Any, database_url: str | URL | None = None, keep: frozenset[str] = NOTEBOOK_STRUCTURE
) -> Any:
    """A copy of a JSON value (a parsed notebook, say) with its passwords masked: every string in it
    (values and dict keys) passed through :func:`redact_urls_in` and, given ``database_url``, every
    string value also through :func:`scrub_password` (its password removed, raw or percent-encoded).

    Only strings are changed, never the structure: dicts stay dicts with the same keys, lists keep
    their length, numbers, booleans and ``None`` stay as they are. This is why a notebook is scrubbed
    here and not as raw JSON text: replacing a short password (``a``, ``1``, ``e``) or one equal to a
    key (``source``) in the raw text would also replace it inside keys and syntax and break the file.

    Within a string value, a very short password is still replaced wherever that substring appears
    (``e`` turns "deploy done" into "d***ploy don***"): the same as for any message, and accepted.
    Dict keys, and the values under the keys in ``keep`` (by default :data:`NOTEBOOK_STRUCTURE`: a
    notebook's ``cell_type``, ``output_type``, stream ``name``…, whose values nbformat checks), are
    never searched for the literal password; they still go through :func:`redact_urls_in`, which
    changes only text shaped like a password (``user:pw@``, ``password=``) and so never a structural
    name. Two keys that redact to the same text keep the later value. For JSON that is not a notebook,
    pass ``keep=frozenset()``.
    """
    secrets = list(dict.fromkeys([*(_passwords(database_url) if database_url else []), *sorted(_KNOWN)]))
    return _scrub_tree(value, secrets, keep, True)


def _scrub_tree(
    value: Any,
    secrets: list[str],
    keep: frozenset[str],
    literal: bool,
    free_text: frozenset[str] = frozenset(),
    shortest: int = 1,
) -> Any:
    if isinstance(value, str):
        masked = redact_urls_in(value)
        if literal:
            for secret in secrets:
                masked = _without(masked, secret, shortest)
        return masked
    if isinstance(value, (list, tuple)):
        return [_scrub_tree(v, secrets, keep, literal, free_text, shortest) for v in value]
    if isinstance(value, dict):
        return {
            redact_urls_in(k) if isinstance(k, str) else k: _scrub_tree(
                v, secrets, keep, (literal or k in free_text) and k not in keep, free_text, shortest
            )
            for k, v in value.items()
        }
    return value
