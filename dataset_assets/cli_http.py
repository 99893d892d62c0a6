"""``dataset http download``: one file behind a URL, or a bundle of the bundles file, with the
engine of ``http_datasets`` (``core.http_bundles``): resume, verification, signed URLs scrubbed.
Progress is the size of the partial file, printed on stderr every few seconds."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path

import click

from . import settings
from .cli_errors import EXIT_INPUT, Failure
from .core.errors import DatasetError
from .core.fmt import human_bytes, scrub_text
from .core.fs import new_file
from .core.http.bundles import Bundle, default_filename, download_bundle, redact_url, try_load_bundles

DEFAULT_BUNDLES_FILE = Path(__file__).resolve().parent / "defs" / "bundles" / "defs.yaml"  # HttpBundles
PROGRESS_EVERY_S = 2.0


def bundles_file(path: Path | None = None) -> Path:
    return Path(path or settings.DATASET_BUNDLES_FILE.get() or DEFAULT_BUNDLES_FILE)


def _bad_input(message: str):
    return Failure(scrub_text(message), EXIT_INPUT)


def bundle_for(
    source: str, *, sha256: str | None, size: int | None, filename: str | None, bundles_path: Path | None
) -> Bundle:
    """A ``Bundle`` for a URL (named after its file), or the named bundle of the bundles file
    with the options given on the command line taking precedence."""
    overrides = {k: v for k, v in {"sha256": sha256, "size": size, "filename": filename}.items() if v is not None}
    try:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source):
            name = re.sub(r"[^A-Za-z0-9_.-]", "_", default_filename(source, "download")).lstrip("._-") or "download"
            return Bundle(name=name[:100], url=source, **overrides)
        path = bundles_file(bundles_path)
        if bundles_path is None and settings.DATASET_BUNDLES_FILE.given():
            click.echo(
                f"warning: DATASET_BUNDLES_FILE is deprecated; declare the bundles in {DEFAULT_BUNDLES_FILE}", err=True
            )
        bundles, problem = try_load_bundles(path, settings.process_environment())  # {{ env.NAME }} values
        if problem is not None:
            raise _bad_input(problem)
        if source not in bundles:
            known = ", ".join(sorted(bundles)) or "none"
            raise _bad_input(f"{source!r} is neither an http(s) URL nor a bundle of {path} (bundles: {known})")
        found = bundles[source]
        fields = {k: getattr(found, k) for k in ("name", "url", "sha256", "size", "filename", "content_type")}
        return Bundle(**{**fields, **overrides})
    except (DatasetError, ValueError) as exc:  # ValueError: a URL that cannot be parsed
        raise _bad_input(str(exc)) from None


def _source_key(url: str) -> str:
    """What identifies where a file came from: the URL without credentials or query (a signed URL
    changes its signature, not its file)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return hashlib.sha256(f"{parts.scheme}://{parts.hostname}:{parts.port}{parts.path}".encode()).hexdigest()


def _check_not_another_files(bundle: Bundle, dest: Path) -> Path:
    """The record of where ``dest/<filename>`` came from; refuse (exit 2) a file of that name that
    another URL left there, unless a sha256 will prove it either way."""
    final, record = dest / bundle.filename, dest / f".{bundle.filename}.source"
    if os.path.lexists(final) and not bundle.sha256:
        try:
            same = record.read_text(encoding="utf-8").strip() == _source_key(bundle.url)
        except OSError:
            same = False
        if not same:
            raise _bad_input(
                f"{final} already exists and was not downloaded from {redact_url(bundle.url)}; give --sha256 to check "
                "it, --filename for another name, or another DEST"
            )
    return record


def _watch(part: Path, total: int | None, stop: threading.Event) -> None:
    last = -1
    while not stop.wait(PROGRESS_EVERY_S):
        try:
            have = part.stat().st_size
        except OSError:
            continue
        if have != last:
            last = have
            of = f" of {human_bytes(total)}" if total else ""
            click.echo(f"progress: {human_bytes(have)}{of}", err=True)


def http_download(
    source: str, dest: Path, *, sha256: str | None, size: int | None, filename: str | None, bundles_file: Path | None
) -> None:
    bundle = bundle_for(source, sha256=sha256, size=size, filename=filename, bundles_path=bundles_file)
    dest = dest.absolute()
    dest.mkdir(parents=True, exist_ok=True)
    record = _check_not_another_files(bundle, dest)
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(dest / f".{bundle.filename}.part", bundle.size, stop), daemon=True, name="progress"
    )
    watcher.start()
    try:
        result = download_bundle(
            bundle, dest, limits=settings.http_limits(), log=lambda line: click.echo(scrub_text(line), err=True)
        )
    finally:
        stop.set()
        watcher.join()
    with new_file(record, "w", encoding="utf-8") as handle:
        handle.write(_source_key(bundle.url) + "\n")
    how = "already complete" if result.skipped else ("resumed, complete" if result.resumed else "complete")
    click.echo(
        f"{how}: {result.path} ({human_bytes(result.bytes)}, sha256 {result.sha256 or 'not computed'}; "
        f"{human_bytes(result.transferred_bytes)} transferred from {redact_url(bundle.url)})"
    )
