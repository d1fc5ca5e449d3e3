"""Atomic writes: a reader (the app polling a run, a resumed run, a download) sees the old file or folder or
the new one, never half of either, and a failed write leaves the old one as it was.

Everything is staged beside its target, in the same folder, because a rename is atomic only within one
file system. Staging names start with a dot, so folder listings that skip hidden names never show them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .finite import json_safe


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A path to write the new content of `path` to; it replaces `path` in one rename when the block ends.

    The staged file has the same name as `path`, inside a hidden folder beside it, so writers that derive
    names from it (`shutil.make_archive` adds ".zip") and the file's permissions work as for `path` itself.

    Args:
        path: the file to write; its folder must exist.

    Returns:
        A context manager yielding the staging path.

    Raises:
        OSError: the staging folder cannot be made or the rename fails. Whatever the block raises passes
            through; in every failure `path` is left as it was and the staging folder is removed.
    """
    path = Path(path)
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        staged = holder / path.name
        yield staged
        os.replace(staged, path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically.

    Args:
        path: the file to write; its folder must exist.
        text: the whole new content.

    Raises:
        OSError: the write or the rename failed; `path` is unchanged.
    """
    with staged_file(path) as staged:
        staged.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data) -> None:
    """Write `data` as indented JSON atomically. A NaN or inf (a perplexity that overflowed) is written as
    null, since they are not JSON; objects JSON does not know are written as their str().

    Args:
        path: the file to write; its folder must exist.
        data: dicts, lists and scalars.

    Raises:
        OSError: the write or the rename failed; `path` is unchanged.
    """
    write_text(path, json.dumps(json_safe(data), indent=2, default=str, allow_nan=False))


@contextmanager
def staged_folder(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """An empty hidden folder beside `target` to build the new folder in; it is renamed to `target` when
    the block ends.

    With `overwrite`, an existing `target` is moved aside first and removed only once the new folder is in
    place; if that rename fails, the old folder is moved back. Without it, the rename onto an existing
    non-empty `target` fails (another process may be reading what it finished first).

    Args:
        target: the folder to create or replace; its parent must exist.
        overwrite: replace an existing `target`.

    Returns:
        A context manager yielding the staging folder.

    Raises:
        OSError: the staging folder cannot be made, or the rename fails (without `overwrite`: `target`
            exists). Whatever the block raises passes through. In every failure the staging folder is
            removed and `target` is as it was.
    """
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if overwrite and target.exists():
            _swap_in(staging, target)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, target: Path) -> None:
    """Replace the folder `target` by `staging`; if the second rename fails, the old folder goes back."""
    old = staging.with_name(staging.name + ".old")
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
