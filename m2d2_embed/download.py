"""Streamed, hashed, atomic downloads; the cache directory; offline mode; Hugging Face Hub files.

Nothing here touches the network or the disk at import time. HTTP uses only ``urllib`` from the
standard library; ``huggingface_hub`` is imported only by :func:`hf_download`.

A download streams into ``<dest>.part`` while hashing it (SHA-256), is verified, and only then renamed
onto ``dest``, so ``dest`` is either absent or complete and verified. A lock file ``<dest>.lock`` makes
concurrent processes share one download.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import filelock
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ENV_CACHE = "M2D2_EMBED_CACHE"
ENV_OFFLINE = "M2D2_EMBED_OFFLINE"
ENV_HF_OFFLINE = "HF_HUB_OFFLINE"

CHUNK = 1 << 20  # bytes per read/write while streaming
USER_AGENT = "m2d2-embed (+https://pypi.org/project/m2d2-embed/)"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NOT_FOUND_STATUSES = {401, 403, 404, 410}  # fail at once: retrying will not help
_DEFAULT_HINT = "run the download once while online, or copy the file to that path"


class DownloadError(RuntimeError):
    """A file could not be downloaded, verified, found in the cache or extracted."""


class ChecksumMismatch(DownloadError):
    """A download (or the checkpoint extracted from it) does not have its pinned SHA-256."""


# --------------------------------------------------------------------------- settings


def cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding downloaded weights (not created here).

    Order: the ``cache_dir`` argument, ``$M2D2_EMBED_CACHE``, ``$XDG_CACHE_HOME/m2d2_embed``,
    ``~/.cache/m2d2_embed``. ``~`` is expanded.
    """
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "m2d2_embed"
    return Path.home() / ".cache" / "m2d2_embed"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline(offline: bool | None = None) -> bool:
    """Whether network access is forbidden.

    An explicit ``offline`` wins; otherwise ``M2D2_EMBED_OFFLINE`` or ``HF_HUB_OFFLINE`` set to
    ``1``/``true``/``yes``/``on`` turns offline mode on.
    """
    if offline is not None:
        return bool(offline)
    return _env_true(ENV_OFFLINE) or _env_true(ENV_HF_OFFLINE)


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str], chunk: int = CHUNK) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _normalise_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    sha = sha256.strip().lower()
    if not _HEX64.fullmatch(sha):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _read_sidecar(dest: Path) -> str | None:
    try:
        words = _sidecar(dest).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return words[0].lower() if words and _HEX64.fullmatch(words[0].lower()) else None


def record_sha256(dest: str | os.PathLike[str], digest: str | None = None) -> str:
    """Record ``digest`` (default: hash ``dest`` now) in ``<dest>.sha256``, so later reads of ``dest`` are
    verified against it. For callers that download with ``record_hash=False`` and record the hash only once the
    file proved usable (e.g. the archive was extracted and converted). Returns the digest."""
    dest = Path(dest)
    digest = digest or sha256_file(dest)
    _write_sidecar(dest, digest)
    return digest


def _write_sidecar(dest: Path, digest: str) -> None:
    """Write ``<dest>.sha256`` (``sha256sum`` format) atomically."""
    side = _sidecar(dest)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(f"{digest}  {dest.name}\n", encoding="ascii")
    os.replace(tmp, side)


def _verified(dest: Path, expected: str | None, *, warn: bool = True, record: bool = True) -> bool:
    """True if ``dest`` exists and matches ``expected`` (or its recorded hash); warns if corrupt.

    A file with neither a pinned nor a recorded hash (placed there by hand) is accepted and, with ``record``,
    its hash recorded, so that later changes are caught.
    """
    if not dest.is_file():
        return False
    recorded = None if expected is not None else _read_sidecar(dest)
    want = expected or recorded
    got = sha256_file(dest)
    if want is None:
        if not record:
            return True
        log.info("%s has no recorded SHA-256; recording %s", dest, got)
        try:
            _write_sidecar(dest, got)
        except OSError as e:  # a read-only cache is fine
            log.debug("could not record the SHA-256 of %s: %s", dest, e)
        return True
    if got == want:
        return True
    source = "pinned" if expected is not None else f"recorded in {_sidecar(dest).name}"
    if warn:
        log.warning("%s is corrupt (SHA-256 %s, expected %s, %s); downloading it again", dest, got, want, source)
    return False


# --------------------------------------------------------------------------- locking


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold ``<dest>.lock`` (a cross-platform lock from ``filelock``) for the duration."""
    lock = filelock.FileLock(str(dest.with_name(dest.name + ".lock")))
    try:
        lock.acquire(timeout=0.5)
    except filelock.Timeout:
        log.info("waiting for another process downloading %s (lock %s)", dest, lock.lock_file)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- HTTP


class _Retryable(Exception):
    """A transient failure: 5xx, 429, a refused or cut connection, a timeout."""


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"{type(err.reason).__name__}: {err.reason}"
    return f"{type(err).__name__}: {err}"


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _stream_once(
    url: str,
    part: Path,
    *,
    timeout: float,
    progress: bool,
    desc: str,
    validator: dict[str, str],
) -> str:
    """One HTTP request appending to (or restarting) ``part``; returns the hex SHA-256 of the whole file.

    If ``part`` holds bytes, they are re-hashed and a ``Range`` request asks for the rest; a server that
    answers 200 instead of 206 restarts the file from zero. ``validator`` carries the ETag or
    Last-Modified of the first response across retries (sent as ``If-Range``).
    """
    offset = part.stat().st_size if part.exists() else 0
    hasher = hashlib.sha256()
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        with open(part, "rb") as f:
            while block := f.read(CHUNK):
                hasher.update(block)
        headers["Range"] = f"bytes={offset}-"
        if "If-Range" in validator:
            headers["If-Range"] = validator["If-Range"]
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in _NOT_FOUND_STATUSES:
            raise DownloadError(
                f"HTTP {e.code} {e.reason} for {url}: the file is missing or not public; "
                "check the URL (or the model registry entry)"
            ) from e
        if e.code == 416 and offset:  # our partial file is no prefix of theirs: start over
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 416 for a resumed request to {url}") from e
        if e.code >= 500 or e.code in (408, 429):
            raise _Retryable(_describe(e)) from e
        raise DownloadError(f"HTTP {e.code} {e.reason} for {url}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Retryable(_describe(e)) from e

    with response:
        status = response.status
        resumed = False
        if offset and status == 206:
            content_range = response.headers.get("Content-Range", "")
            resumed = content_range.startswith(f"bytes {offset}-")
            if not resumed:
                part.unlink(missing_ok=True)
                raise _Retryable(f"unexpected Content-Range {content_range!r} from {url}")
            log.info("resuming %s at byte %d", url, offset)
        elif offset:
            log.info("%s does not support resuming (HTTP %d); restarting from zero", url, status)
        if not resumed:
            offset = 0
            hasher = hashlib.sha256()
            validator.clear()
            tag = response.headers.get("ETag") or response.headers.get("Last-Modified")
            if tag and not tag.startswith("W/"):
                validator["If-Range"] = tag
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = offset
        with (
            open(part, "ab" if resumed else "wb") as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    hasher.update(block)
                    received += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise _Retryable(f"connection lost after {received} bytes: {_describe(e)}") from e
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise _Retryable(f"connection lost after {received} of {total} bytes")
    return hasher.hexdigest()


def _fetch(
    url: str,
    part: Path,
    *,
    retries: int,
    backoff: float,
    timeout: float,
    progress: bool,
    desc: str,
) -> str:
    """Download ``url`` into ``part`` with bounded retries; returns the hex SHA-256."""
    validator: dict[str, str] = {}
    attempt = 0
    while True:
        try:
            return _stream_once(url, part, timeout=timeout, progress=progress, desc=desc, validator=validator)
        except _Retryable as e:
            attempt += 1
            if attempt > retries:
                raise DownloadError(
                    f"could not download {url} after {attempt} attempts ({e}); check the network and try again"
                ) from e
            delay = backoff * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retry %d/%d in %.1fs", url, e, attempt, retries, delay)
            time.sleep(delay)


def download_url(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    progress: bool | None = None,
    retries: int = 4,
    backoff: float = 0.5,
    timeout: float = 60,
    offline: bool | None = None,
    hint: str | None = None,
    record_hash: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (streamed, SHA-256 verified, atomic) unless a verified copy exists.

    Args:
        url: HTTP(S) URL; redirects are followed, also to other hosts.
        dest: final path. Its parent is created. ``<dest>.part`` holds the download in progress,
            ``<dest>.lock`` serialises processes, ``<dest>.sha256`` records the hash when none is pinned.
        sha256: expected hex SHA-256. If None, the hash of the first download is recorded in
            ``<dest>.sha256`` and an existing ``dest`` is checked against it.
        progress: show a tqdm bar on stderr; None shows it when stderr is a terminal.
        retries: extra attempts after a 5xx/429/connection error/timeout, waiting
            ``backoff * 2**k`` seconds before retry ``k + 1``. A cut transfer resumes with a ``Range``
            request when the server allows it (206), otherwise restarts from zero.
        timeout: socket timeout in seconds (connect and each read).
        offline: forbid the network (default: :func:`is_offline`); then ``dest`` must already exist.
        hint: what the user should do if the file is missing offline, e.g.
            ``"run `m2d2-embed download NAME` while online"``.
        record_hash: without a pinned ``sha256``, record the hash of the download in ``<dest>.sha256``.
            False leaves that to the caller (:func:`record_sha256`), once it knows the file is usable.

    Returns:
        ``dest`` as a Path.

    Raises:
        DownloadError: offline and missing, HTTP 401/403/404/410, retries exhausted.
        ChecksumMismatch: the download does not match ``sha256`` (the ``.part`` file is deleted; ``dest`` is
            never left corrupt).
    """
    dest = Path(dest).expanduser()
    expected = _normalise_sha(sha256)
    if _verified(dest, expected, record=record_hash):
        return dest
    if is_offline(offline):
        state = "is corrupt" if dest.exists() else "is not downloaded"
        raise DownloadError(
            f"{dest} {state} and offline mode is on (offline=True, {ENV_OFFLINE}=1 or {ENV_HF_OFFLINE}=1); "
            f"{hint or _DEFAULT_HINT} (source: {url})"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if _verified(dest, expected, warn=False, record=record_hash):  # another process finished it meanwhile
            return dest
        part = dest.with_name(dest.name + ".part")
        if part.exists() and expected is None:
            # Without a pinned hash a stale part from another run (maybe another file version) can't
            # be checked, so only resume within this call.
            part.unlink()
        carried_over = part.exists() and part.stat().st_size > 0
        if carried_over:
            log.info("found %s from an earlier run; resuming it", part)
        options = dict(retries=retries, backoff=backoff, timeout=timeout, progress=_show_progress(progress))
        try:
            got = _fetch(url, part, desc=dest.name, **options)
            if expected is not None and got != expected and carried_over:
                log.warning("resumed download of %s does not match its SHA-256; restarting from zero", url)
                part.unlink(missing_ok=True)
                got = _fetch(url, part, desc=dest.name, **options)
        except DownloadError:
            if expected is None:  # a part without a pinned hash cannot be trusted by a later resume
                part.unlink(missing_ok=True)
            elif part.exists():
                log.info("keeping %s (%d bytes); the next attempt resumes it", part, part.stat().st_size)
            raise
        if expected is not None and got != expected:
            part.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"SHA-256 mismatch for {url}: expected {expected}, got {got}. The download was deleted; "
                "retry, and if it persists the file on the server changed (update the pinned hash)"
            )
        if expected is None and record_hash:
            _write_sidecar(dest, got)  # before the rename: dest never exists without its hash
        os.replace(part, dest)
        log.info("downloaded %s to %s (SHA-256 %s)", url, dest, got)
    return dest


# --------------------------------------------------------------------------- zip


def _check_member_name(member: str) -> None:
    name = member.replace("\\", "/")
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or re.match(r"[A-Za-z]:", name):
        raise DownloadError(
            f"refusing zip member {member!r}: its path is absolute or leaves the archive (contains '..')"
        )


def extract_member(zip_path: str | os.PathLike[str], member: str, dest: str | os.PathLike[str]) -> Path:
    """Extract one file ``member`` of a zip archive to ``dest``, streamed and atomic.

    Always extracts (overwriting ``dest``); the data goes through a temporary file in ``dest``'s
    directory that is renamed onto ``dest`` once complete, and the zip CRC is checked on the way.

    Raises:
        DownloadError: the member name is absolute or contains ``..`` (zip-slip), the member is not in
            the archive (the message lists the first 20 members), it is a directory, or the archive is
            damaged.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    _check_member_name(member)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                names = zf.namelist()
                shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
                raise DownloadError(
                    f"{zip_path} has no member {member!r}; it holds {len(names)}: {shown or '(nothing)'}. "
                    "The archive may be a different release than expected: delete it to download it again"
                ) from None
            if info.is_dir():
                raise DownloadError(f"{member!r} in {zip_path} is a directory, not a file")
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            try:
                with zf.open(info) as src, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp_name, dest)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise DownloadError(f"{zip_path} is damaged ({e}); delete it to download it again") from e
    log.info("extracted %s from %s to %s", member, zip_path, dest)
    return dest


# --------------------------------------------------------------------------- Hugging Face Hub


class HFSpec(NamedTuple):
    """A parsed ``hf://owner/repo[/path][@revision]``."""

    repo_id: str  # "owner/repo"
    filename: str | None  # path inside the repo; None for the whole repo
    revision: str | None  # branch, tag or commit; None for the default branch


def parse_hf_spec(repo_spec: str) -> HFSpec:
    """Parse ``hf://owner/repo[/path/in/repo][@revision]``; raises ValueError if malformed."""
    if not repo_spec.startswith("hf://"):
        raise ValueError(f"not a Hugging Face spec: {repo_spec!r}; expected hf://owner/repo[/path][@revision]")
    body, at, revision = repo_spec[len("hf://") :].rpartition("@")
    if not at:
        body, revision = revision, ""
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2 or (at and not revision) or any(p in (".", "..") for p in parts):
        raise ValueError(f"malformed Hugging Face spec {repo_spec!r}; expected hf://owner/repo[/path][@revision]")
    return HFSpec("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)


def hf_download(
    repo_spec: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    hint: str | None = None,
) -> Path:
    """Fetch a file or a whole repo from the Hugging Face Hub through ``huggingface_hub``.

    ``hf://owner/repo/path/to/file[@rev]`` returns the local file; ``hf://owner/repo[@rev]`` returns the
    local snapshot directory. The Hub's own cache (``HF_HUB_CACHE``/``HF_HOME``), token and
    ``HF_ENDPOINT`` apply; ``cache_dir`` overrides the Hub cache directory. Offline (see
    :func:`is_offline`), only the local cache is used.

    Raises:
        ValueError: malformed spec.
        DownloadError: offline and not cached (the message includes ``hint``), repo/revision/file not
            found, or a network/HTTP error.
    """
    spec = parse_hf_spec(repo_spec)
    import huggingface_hub
    from huggingface_hub import utils as hf_errors  # the error classes live here since 0.20

    local_only = is_offline(offline)
    kwargs = dict(
        repo_id=spec.repo_id,
        revision=spec.revision,
        cache_dir=None if cache_dir is None else str(Path(cache_dir).expanduser()),
        local_files_only=local_only,
    )
    try:
        if spec.filename is None:
            path = huggingface_hub.snapshot_download(**kwargs)
        else:
            path = huggingface_hub.hf_hub_download(filename=spec.filename, **kwargs)
    except hf_errors.LocalEntryNotFoundError as e:
        offline_now = local_only or huggingface_hub.constants.HF_HUB_OFFLINE
        why = "offline mode is on" if offline_now else "the Hub could not be reached"
        raise DownloadError(
            f"{repo_spec} is not in the Hugging Face cache and {why}; {hint or _DEFAULT_HINT} ({e})"
        ) from e
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
        raise DownloadError(
            f"{repo_spec}: repository or revision not found on {huggingface_hub.constants.ENDPOINT} "
            f"(private or gated repos need `hf auth login` or HF_TOKEN): {e}"
        ) from e
    except hf_errors.EntryNotFoundError as e:
        raise DownloadError(f"{repo_spec}: no file {spec.filename!r} in {spec.repo_id}: {e}") from e
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise DownloadError(f"could not download {repo_spec} from the Hugging Face Hub: {e}") from e
    return Path(path)


__all__ = [
    "ChecksumMismatch",
    "DownloadError",
    "HFSpec",
    "cache_dir",
    "download_url",
    "extract_member",
    "hf_download",
    "is_offline",
    "parse_hf_spec",
    "record_sha256",
    "sha256_file",
]
