"""Where a store lives: a local directory or an fsspec URL (memory://, s3://, gs://, ...).

Zarr opens both (a path, or its fsspec store for a URL); this file answers the questions zarr does
not: does the store exist, how many bytes does an array take, delete it, read/write the small plain
objects beside the arrays (the targets writer's lock), and copy a whole directory tree up or down (a
token store at a URL). `file://` URLs become local paths. Credentials and endpoints come from the
protocol package's usual environment (for s3fs: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

from pipeline.errors import KdcacheError


def check_protocol(protocol: str, text: str) -> None:
    """Refuse a URL whose protocol fsspec does not know, or whose package is not installed."""
    from fsspec.registry import known_implementations, registry

    if protocol in registry:
        return
    known = known_implementations.get(protocol)
    if known is None:
        raise KdcacheError(f"{text}: unknown storage protocol {protocol!r}; use a local path or an fsspec "
                           f"URL such as s3://bucket/store.zarr, gs://..., memory://...")
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        hint = known.get("err") or f"install the fsspec package for {protocol}://"
        raise KdcacheError(f"{text}: {hint}") from None


def write_text(path: str | Path, text: str, option: str) -> None:
    """Write a small local output file whole, or raise naming `option` and the path (a read-only or full
    disk); a file cut short by a full disk is removed, so that nothing half-written is left."""
    tmp = Path(f"{path}.partial")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as error:
        if tmp.exists():
            tmp.unlink()
        raise KdcacheError(f"cannot write {option} {path}: {error.strerror or error}.") from None


class Location:
    """A store's root: `text` as given, `url` for zarr (a local path or an fsspec URL)."""

    def __init__(self, text: str | Path):
        self.text = str(text)
        protocol, _, rest = self.text.partition("://") if "://" in self.text else ("", "", self.text)
        if protocol in ("file", "local"):
            protocol, self.text = "", rest
        self.local = protocol == ""
        if self.local:
            self.url, self.fs, self.root = self.text, None, self.text
        else:
            check_protocol(protocol, self.text)
            self.fs, self.root = fsspec.core.url_to_fs(self.text)
            self.url = self.text

    def __str__(self) -> str:
        return self.text

    def child(self, name: str) -> str:
        """The path of `name` under the root ("": the root itself)."""
        if not name:
            return self.root
        return os.path.join(self.root, name) if self.local else f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str = "") -> bool:
        path = self.child(name)
        return os.path.exists(path) if self.local else self.fs.exists(path)

    def is_file(self) -> bool:
        return os.path.isfile(self.root) if self.local else self.fs.isfile(self.root)

    def check_writable(self, option: str = "--out") -> None:
        """Refuse, before any work, a root that is a file or under which nothing can be written (a
        read-only disk or bucket, no permission): a probe file is written and removed. Locally the probe
        goes to the nearest directory that exists, so that nothing is created here."""
        if self.is_file():
            raise KdcacheError(f"{option} {self} is a file; it must name a directory. Choose another {option}.")
        probe = f".kdcache-probe-{os.getpid()}"
        try:
            if self.local:
                existing = self._nearest_existing()
                if not existing.is_dir():
                    raise NotADirectoryError(f"{existing} is a file")
                with tempfile.TemporaryFile(dir=existing, prefix=probe):
                    pass
            else:
                self.fs.pipe_file(self.child(probe), b"")
                self.fs.rm(self.child(probe))
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            raise KdcacheError(f"cannot write to {option} {self}: {reason}. Choose a writable {option}, "
                               f"or make it writable.") from None

    def check_free_space(self, needed: int, what: str, option: str = "--out") -> None:
        """Refuse, before any work, a local root whose disk has fewer than `needed` bytes free (a full
        disk would otherwise fail only when the result is saved). At a URL: nothing to ask."""
        if not self.local:
            return
        free = shutil.disk_usage(self._nearest_existing()).free
        if free < needed:
            raise KdcacheError(f"{option} {self}: its disk has {free / 2**20:.1f} MiB free and {what} needs about "
                               f"{needed / 2**20:.1f} MiB; free space there or choose another {option}.")

    def _nearest_existing(self) -> Path:
        """The root, or its nearest ancestor that exists (local only)."""
        existing = Path(os.path.abspath(self.root))
        while not existing.exists():
            existing = existing.parent
        return existing

    def names(self) -> list[str]:
        """Entries directly under the root ([] when it does not exist)."""
        if self.local:
            return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        if not self.fs.exists(self.root):
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False))

    def size(self, name: str) -> int:
        """Bytes stored under `name` (an array's directory)."""
        path = self.child(name)
        if self.local:
            return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return int(self.fs.du(path, total=True)) if self.fs.exists(path) else 0

    def delete(self, name: str) -> None:
        """Remove one entry under the root (a file or a whole directory), if present."""
        path = self.child(name)
        if self.local:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def read_json(self, name: str) -> dict | None:
        """A small JSON object under the root; None when absent or unreadable (a torn write)."""
        try:
            if self.local:
                return json.loads(Path(self.child(name)).read_text())
            return json.loads(self.fs.cat_file(self.child(name)))
        except (FileNotFoundError, ValueError):
            return None

    def create_json(self, name: str, value: dict) -> bool:
        """Write `value` only if `name` does not exist; False when it did. Atomic on a local disk
        (O_EXCL); on object storage a put then a read-back, which two writers starting in the same
        instant can both pass (documented in docs/FORMAT.md)."""
        data = json.dumps(value, sort_keys=True).encode()
        if self.local:
            os.makedirs(self.root, exist_ok=True)
            try:
                fd = os.open(self.child(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.fs.exists(self.child(name)):
            return False
        self.fs.pipe_file(self.child(name), data)
        return self.read_json(name) == json.loads(data)

    # --- whole trees (token stores: written locally, then uploaded; downloaded to be memory-mapped) ----

    def upload(self, local: Path, last: str) -> None:
        """Replace a remote root by the local directory `local`; the file `last` goes up after every
        other file, so that a store holding it is whole."""
        self.delete("")
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.relative_to(local).as_posix() == last):
            self.fs.put_file(str(path), self.child(path.relative_to(local).as_posix()))

    def download(self, local: Path) -> None:
        """Copy every file under a remote root into the local directory `local`."""
        root = self.root.rstrip("/")
        for remote in self.fs.find(root):
            target = local / remote[len(root):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(target))
