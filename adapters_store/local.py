"""The embedded adapter store: a directory tree ``ROOT/<tenant>/<name>/`` of versioned blobs and their info.

Per adapter: ``v<N>.safetensors`` (the blob), ``v<N>.json`` (its ``AdapterInfo``), ``current.json`` (a copy of
the current version's info), ``.next_version`` (survives deletes) and ``.lock``. Writers hold an ``flock`` on
``.lock`` (threads and processes alike) and publish every file by temp file + fsync + ``os.replace``; readers
take no lock and never see a torn file or a ``current.json`` naming a blob that was never written.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ptserve.adapters_store.errors import AdapterNotFound, IntegrityError, InvalidAdapterId, StoreUnavailable
from ptserve.adapters_store.ids import NAME_RE, TENANT_RE, AdapterId, check_tenant
from ptserve.adapters_store.store import AdapterInfo, AdapterMeta, AdapterStore, Page, register_store

KEEP_PREVIOUS = 2  # older versions stay readable for readers that resolved current.json just before a put
_VERSION_FILE = re.compile(r"v(\d+)\.(?:safetensors|json)")  # fullmatch
_TMP_PREFIX = ".tmp-"


class LocalDirStore(AdapterStore):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"
        with contextlib.suppress(OSError):  # ping() reports it, so a server still starts (readyz: 503)
            self.root.mkdir(parents=True, exist_ok=True)

    async def put(self, adapter_id: AdapterId, blob: bytes, meta: AdapterMeta) -> AdapterInfo:
        return await self._call(self._put, adapter_id, bytes(blob), meta)

    async def get_info(self, adapter_id: AdapterId) -> AdapterInfo:
        return await self._call(self._get_info, adapter_id)

    async def get_blob(self, adapter_id: AdapterId, version: int | None = None) -> tuple[AdapterInfo, bytes]:
        return await self._call(self._get_blob, adapter_id, version)

    async def list(self, tenant: str | None = None, cursor: str | None = None, limit: int = 100) -> Page:
        return await self._call(self._list, tenant, cursor, limit)

    async def delete(self, adapter_id: AdapterId) -> None:
        await self._call(self._delete, adapter_id)

    async def ping(self) -> None:
        await self._call(self._ping)

    async def _call(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as e:  # disk full, permissions, root gone: the store is at fault, not the request
            raise StoreUnavailable(f"adapter store {self.url}: {e}") from e

    def _dir(self, adapter_id: AdapterId) -> Path:
        path = (self.root / adapter_id.tenant / adapter_id.name).resolve()
        # AdapterId forbids '..' and '/', but neither a symlink nor an unchecked id may escape ROOT.
        if path.parent.parent != self.root:
            raise InvalidAdapterId(f"adapter id {adapter_id} does not name a directory inside the store")
        return path

    def _put(self, adapter_id: AdapterId, blob: bytes, meta: AdapterMeta) -> AdapterInfo:
        sha256 = hashlib.sha256(blob).hexdigest()  # outside the lock: large blobs hash slowly
        d = self._dir(adapter_id)
        d.mkdir(parents=True, exist_ok=True)
        with _locked(d / ".lock"):
            version = _next_version(d)
            info = AdapterInfo(
                id=str(adapter_id), version=version, sha256=sha256, task=meta.task,
                num_virtual_tokens=meta.num_virtual_tokens, labels=[*meta.labels], bytes=len(blob),
                created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z",
            )
            info_bytes = json.dumps(info.to_json()).encode()
            _write_atomic(d / ".next_version", str(version + 1).encode())
            _write_atomic(d / f"v{version}.safetensors", blob)
            _write_atomic(d / f"v{version}.json", info_bytes)
            _fsync_dir(d)  # the blob's name is durable before current.json may point at it
            _write_atomic(d / "current.json", info_bytes)
            _fsync_dir(d)
            _prune(d, below=version - KEEP_PREVIOUS)
        return info

    def _get_info(self, adapter_id: AdapterId) -> AdapterInfo:
        try:
            return _read_info(self._dir(adapter_id) / "current.json")
        except FileNotFoundError:
            raise _not_found(adapter_id) from None

    def _get_blob(self, adapter_id: AdapterId, version: int | None) -> tuple[AdapterInfo, bytes]:
        d, missing = self._dir(adapter_id), None
        while True:
            try:
                info = _read_info(d / ("current.json" if version is None else f"v{version}.json"))
            except FileNotFoundError:
                raise _not_found(adapter_id, version) from None
            try:
                blob = (d / f"v{info.version}.safetensors").read_bytes()
                break
            except FileNotFoundError:
                if version is not None:
                    raise _not_found(adapter_id, version) from None
                # Puts since we read current.json pruned its version: read the new current. The same version
                # missing twice is damage, not a race.
                if info.version == missing:
                    raise IntegrityError(f"adapter {adapter_id}: blob of current version {missing} missing")
                missing = info.version
        if len(blob) != info.bytes or hashlib.sha256(blob).hexdigest() != info.sha256:
            raise IntegrityError(f"adapter {adapter_id} version {info.version}: bytes fail their sha256")
        return info, blob

    def _list(self, tenant: str | None, cursor: str | None, limit: int) -> Page:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        tenants = [check_tenant(tenant)] if tenant is not None else _subdirs(self.root)
        ids = sorted(f"{t}/{n}" for t in tenants for n in _subdirs(self.root / t) if _valid(t, n))
        items: list[AdapterInfo] = []
        for text in ids[bisect.bisect_right(ids, cursor) if cursor is not None else 0:]:
            try:
                items.append(_read_info(self.root / text / "current.json"))
            except FileNotFoundError:
                continue  # deleted (only the version counter is left) or not yet published
            if len(items) > limit:
                break
        more = len(items) > limit
        del items[limit:]
        return Page(items=items, next_cursor=items[-1].id if more else None)

    def _delete(self, adapter_id: AdapterId) -> None:
        d = self._dir(adapter_id)
        if not d.is_dir():
            raise _not_found(adapter_id)
        with _locked(d / ".lock"):
            try:
                os.unlink(d / "current.json")  # first: readers see "not found", never a half-deleted tree
            except FileNotFoundError:
                raise _not_found(adapter_id) from None
            _prune(d, below=None)
            _fsync_dir(d)

    def _ping(self) -> None:
        if not self.root.is_dir():
            raise StoreUnavailable(f"adapter store root {self.root} is not a directory")
        fd, probe = tempfile.mkstemp(dir=self.root, prefix=_TMP_PREFIX)
        os.close(fd)
        os.unlink(probe)


@register_store("file")
def open_local_store(url: str) -> LocalDirStore:
    """``file://PATH``: whatever follows ``file://`` is a filesystem path (relative ones to the CWD)."""
    path = url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:")
    if not path:
        raise ValueError(f"store URL {url!r} names no directory")
    return LocalDirStore(path)


@contextlib.contextmanager
def _locked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # flock is per open file, so it also excludes threads of one process
        yield
    finally:
        os.close(fd)


def _next_version(d: Path) -> int:
    try:
        counted = int((d / ".next_version").read_text())
    except (FileNotFoundError, ValueError):
        counted = 1
    on_disk = max((int(m[1]) for e in os.scandir(d) if (m := _VERSION_FILE.fullmatch(e.name))), default=0)
    return max(counted, on_disk + 1)


def _prune(d: Path, below: int | None) -> None:
    """Remove versions older than ``below`` (all when None) and temp files of writers that died mid-write."""
    for entry in os.scandir(d):
        m = _VERSION_FILE.fullmatch(entry.name)
        if entry.name.startswith(_TMP_PREFIX) or (m and (below is None or int(m[1]) < below)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _not_found(adapter_id: AdapterId, version: int | None = None) -> AdapterNotFound:
    at = "" if version is None else f" at version {version}"
    return AdapterNotFound(f"adapter {adapter_id} not found{at}")


def _read_info(path: Path) -> AdapterInfo:
    return AdapterInfo.from_json(json.loads(path.read_bytes()))


def _subdirs(path: Path) -> list[str]:
    """Real (not symlinked) subdirectories, so listing never reads outside ROOT."""
    with contextlib.suppress(FileNotFoundError):
        return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    return []


def _valid(tenant: str, name: str) -> bool:
    return bool(TENANT_RE.fullmatch(tenant) and NAME_RE.fullmatch(name) and ".." not in name)
