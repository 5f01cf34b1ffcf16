"""SSH signatures, made and checked by OpenSSH's ``ssh-keygen -Y`` (as git's SSH commit signing does).

Who may sign is an ``allowed_signers`` file (``ssh-keygen(1)``, ALLOWED SIGNERS): one line per key,
``principal [options] keytype key``. A signature is made over bytes with a namespace, so that a plan's
approval can never stand for a ledger entry's signature, or the other way round. opslib writes no
cryptography of its own: every signature is made and checked by ``ssh-keygen``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from opslib.errors import ConfigError

PLAN = "opslib-plan"  # the namespace of an approval of a plan
LEDGER = "opslib-ledger"  # the namespace of a ledger entry's signature

_TIMEOUT_S = 60  # a key behind a passphrase prompt or a hardware token waits for a person, not for ever


def program() -> str:
    """The ``ssh-keygen`` on PATH; missing is a :class:`ConfigError` naming the package."""
    found = shutil.which("ssh-keygen")
    if found is None:
        raise ConfigError("ssh-keygen is not installed: install OpenSSH's client (Debian: openssh-client)")
    return found


def _keygen(args: list[str], data: bytes | None = None) -> subprocess.CompletedProcess:
    """``ssh-keygen ARGS`` with ``data`` on its stdin; one that cannot be run, or does not end within the
    timeout (a hardware key waiting for a touch), is a :class:`ConfigError`."""
    try:
        # A session of its own: no terminal to ask a passphrase on, so a key that needs one fails at once
        # (said as such) instead of stalling a run on a prompt nobody sees.
        return subprocess.run([program(), *args], input=data or b"", capture_output=True, timeout=_TIMEOUT_S,
                              check=False, start_new_session=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ConfigError(f"ssh-keygen {args[1]} gave no answer within {_TIMEOUT_S} s (a key waiting for a touch?)") from None
    except OSError as err:
        raise ConfigError(f"ssh-keygen cannot be run: {err.strerror or err}") from None


def _when(at: str | None) -> list[str]:
    """The option that checks keys as they were valid at ``at`` (an ISO time, as records hold them), so that
    a key retired since (``valid-before`` in allowed_signers) still vouches for what it signed before."""
    if not at:
        return []
    digits = "".join(c for c in at if c.isdigit())[:14]
    return ["-O", f"verify-time={digits}Z"] if len(digits) == 14 else []


def sign(data: bytes, key: Path, namespace: str) -> str:
    """An armored SSH signature of ``data`` by ``key`` (a private key file, or a public key whose private
    half ssh-agent holds); a key that cannot sign is a :class:`ConfigError` with ssh-keygen's reason."""
    key = Path(key).expanduser()
    if not key.is_file():
        raise ConfigError(f"the signing key {key} {'is a folder' if key.is_dir() else 'does not exist'}")
    done = _keygen(["-Y", "sign", "-q", "-f", str(key), "-n", namespace], data)
    if done.returncode != 0 or b"BEGIN SSH SIGNATURE" not in done.stdout:
        reason = _reason(done.stderr)
        if "passphrase" in reason:  # ssh-keygen reads the data on stdin as the passphrase: say what to do instead
            reason = (f"the key needs its passphrase, which a run cannot ask for: add it to ssh-agent (`ssh-add {key}`) "
                      f"and name its public key ({key}.pub)")  # fmt: skip
        raise ConfigError(f"ssh-keygen could not sign with {key}: {reason}")
    return done.stdout.decode()


def principals(signature: str, allowed_signers: Path, at: str | None = None) -> list[str]:
    """The principals ``allowed_signers`` names for the key that made ``signature`` (none: an unknown key),
    among the keys valid at ``at`` (default: now)."""
    with _signature_file(signature) as path:
        done = _keygen(["-Y", "find-principals", "-s", str(path), "-f", str(allowed_signers), *_when(at)])
    if done.returncode != 0:
        return []
    found = [line.strip() for line in done.stdout.decode(errors="replace").splitlines() if line.strip()]
    return [p for p in found if not any(c in p for c in "*?!")]  # a pattern names no one person


def verifies(data: bytes, signature: str, principal: str, allowed_signers: Path, namespace: str,
             at: str | None = None) -> bool:  # fmt: skip
    """Whether ``signature`` is ``principal``'s signature of ``data`` in ``namespace``, by a key
    ``allowed_signers`` gives that principal (its namespaces, and its validity at ``at``, default now)."""
    if not principal or "\n" in principal or any(c in principal for c in "*?,!"):
        return False  # one principal, never a pattern: a wildcard in allowed_signers names no one person
    with _signature_file(signature) as path:
        done = _keygen(["-Y", "verify", "-f", str(allowed_signers), "-I", principal, "-n", namespace, "-s", str(path),
                        *_when(at)], data)  # fmt: skip
    return done.returncode == 0


def signer_of(data: bytes, signature: str, allowed_signers: Path, namespace: str, at: str | None = None) -> str | None:
    """The principal whose valid signature of ``data`` ``signature`` is, or None (an unknown key, another
    namespace, other data, or not a signature at all); keys as valid at ``at`` (default now)."""
    return next(
        (p for p in principals(signature, allowed_signers, at) if verifies(data, signature, p, allowed_signers, namespace, at)),
        None,
    )


@dataclass
class Signer:
    """A key that signs as the principal ``allowed_signers`` gives it."""

    key: Path
    allowed_signers: Path
    namespace: str = LEDGER
    _principal: str | None = field(default=None, repr=False)

    @property
    def principal(self) -> str | None:
        """The principal of this key in ``allowed_signers`` (asked once), None when the file does not list it."""
        if self._principal is None:
            probe = b"opslib: which principal is this key?"
            found = signer_of(probe, sign(probe, self.key, self.namespace), self.allowed_signers, self.namespace)
            self._principal = found or ""
        return self._principal or None

    def sign(self, data: bytes) -> str:
        """This key's signature of ``data`` in this signer's namespace."""
        return sign(data, self.key, self.namespace)


_SIGNERS: dict[tuple[Path, Path], tuple[Signer | None, str]] = {}


def signer(key: Path | None, allowed_signers: Path) -> tuple[Signer | None, str]:
    """The signer of ``key`` when ``allowed_signers`` lists it, else None; and, either way, one line saying
    so (for a run's preflight). Asked once per process and key: it signs a probe to learn the principal."""
    if key is None:
        return None, "not signed: no OPSLIB_SIGNING_KEY"
    where = (Path(key), Path(allowed_signers))
    if where not in _SIGNERS:
        if not Path(allowed_signers).is_file():
            _SIGNERS[where] = None, f"not signed: no allowed_signers file at {allowed_signers}"
        else:
            made = Signer(Path(key), Path(allowed_signers))
            try:
                principal = made.principal
            except ConfigError as err:
                _SIGNERS[where] = None, f"not signed: {err.message}"
            else:
                _SIGNERS[where] = (made, f"signed by {principal}") if principal else (
                    None, f"not signed: the key {key} is not in {allowed_signers}")  # fmt: skip
    return _SIGNERS[where]


@contextmanager
def _signature_file(signature: str) -> Iterator[Path]:
    """A signature written to a private temporary file, as ``ssh-keygen -s`` needs a path."""
    with tempfile.TemporaryDirectory(prefix="opslib-sig-") as folder:
        path = Path(folder) / "signature"
        path.write_text(signature if isinstance(signature, str) else "")
        yield path


def _reason(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"
