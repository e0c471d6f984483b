"""The contract every ``AdapterStore`` keeps, run against each store; local-directory specifics at the end."""
from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import random
import shutil
from datetime import datetime, timedelta, timezone

import pytest

from ptserve.adapters_store.errors import AdapterNotFound, IntegrityError, InvalidAdapterId, StoreUnavailable
from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.local import LocalDirStore
from ptserve.adapters_store.store import AdapterMeta, AdapterStore, open_store

META = AdapterMeta(task="classification", num_virtual_tokens=16, labels=("neg", "pos"))
ID = AdapterId.of("acme", "sentiment")


def make_blob(seed: int, size: int = 4096) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["local", "redis"])
async def store(request, tmp_path) -> AdapterStore:
    if request.param == "local":
        s = open_store("file://" + str(tmp_path / "store"))
    else:  # a fresh session redis-server (tests/conftest.py); a key prefix of this test's own
        url, prefix = request.getfixturevalue("redis_server"), request.getfixturevalue("redis_prefix")
        s = open_store(f"{url}?prefix={prefix}")
    yield s
    await s.close()


def ordered_across_pages(store: AdapterStore) -> bool:
    """The local store pages through ids in order; Redis pages follow SCAN order (each page sorted, and a page
    may exceed ``limit`` by what one SCAN reply brings)."""
    return isinstance(store, LocalDirStore)


async def test_put_then_get_returns_the_same_bytes(store):
    data = make_blob(1)
    put = await store.put(ID, data, META)
    info, got = await store.get_blob(ID)
    assert got == data
    assert info == put == await store.get_info(ID)


async def test_info_records_what_was_put(store):
    data = make_blob(2, 1234)
    before = datetime.now(timezone.utc)
    info = await store.put(ID, data, META)
    assert info.id == "acme/sentiment"
    assert (info.version, info.sha256, info.bytes) == (1, sha(data), 1234)
    assert (info.task, info.num_virtual_tokens, info.labels) == ("classification", 16, ["neg", "pos"])
    created = datetime.fromisoformat(info.created_at.replace("Z", "+00:00"))
    assert created.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= created <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert json.loads(json.dumps(info.to_json())) == info.to_json()


async def test_versions_increase_and_stay_monotonic_across_delete(store):
    assert [(await store.put(ID, make_blob(i), META)).version for i in range(3)] == [1, 2, 3]
    await store.delete(ID)
    again = await store.put(ID, make_blob(9), META)
    assert again.version == 4
    assert (await store.get_info(ID)).version == 4
    other = AdapterId.of("acme", "other")
    assert (await store.put(other, b"x", META)).version == 1  # counters are per adapter


async def test_previous_version_is_readable_by_number(store):
    old, new = make_blob(10), make_blob(11)
    await store.put(ID, old, META)
    await store.put(ID, new, META)
    info, got = await store.get_blob(ID, version=1)
    assert (info.version, info.sha256, got) == (1, sha(old), old)
    info, got = await store.get_blob(ID, version=2)
    assert (info.version, got) == (2, new)
    assert (await store.get_blob(ID))[1] == new
    with pytest.raises(AdapterNotFound):
        await store.get_blob(ID, version=3)


async def test_list_orders_by_id_filters_by_tenant_and_paginates(store):
    assert (await store.list()).items == []
    # As id strings 'a-b/..' < 'a/..' ('-' < '/') though tenant 'a' < 'a-b': the order is the id string's.
    ids = [AdapterId.of(t, n) for t in ("a", "a-b", "b_c", "z9") for n in ("X", "a.b", "m-1", "m", "zz")]
    await asyncio.gather(*(store.put(i, str(i).encode(), META) for i in ids))
    gone = AdapterId.of("b_c", "m")
    await store.delete(gone)
    expected = sorted(str(i) for i in ids if i != gone)

    for limit in (1, 3, 4, 100):
        seen, cursor, pages = [], None, 0
        while True:
            page = await store.list(cursor=cursor, limit=limit)
            names = [info.id for info in page.items]
            assert names == sorted(names)
            assert len(names) <= limit or not ordered_across_pages(store)
            seen += names
            pages += 1
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        if ordered_across_pages(store):
            assert seen == expected, f"limit={limit}"
            assert pages == -(-len(expected) // limit)
        else:
            assert sorted(seen) == expected, f"limit={limit}"  # every id exactly once

    page = await store.list(tenant="a", limit=2)
    rest = (await store.list(tenant="a", cursor=page.next_cursor, limit=10)).items if page.next_cursor else []
    first = page.items
    got = [i.id for i in first + rest]
    got = got if ordered_across_pages(store) else sorted(got)
    assert got == sorted(str(i) for i in ids if i.tenant == "a")
    assert all(i.version == 1 and i.bytes == len(i.id) for i in first + rest)
    assert (await store.list(tenant="nobody")).items == []


async def test_deleted_adapter_is_gone(store):
    await store.put(ID, make_blob(3), META)
    await store.put(ID, make_blob(4), META)
    await store.delete(ID)
    with pytest.raises(AdapterNotFound):
        await store.get_info(ID)
    with pytest.raises(AdapterNotFound):
        await store.get_blob(ID)
    with pytest.raises(AdapterNotFound):
        await store.get_blob(ID, version=1)
    assert (await store.list()).items == []
    with pytest.raises(AdapterNotFound):
        await store.delete(ID)


async def test_versions_names_each_current_version_or_none(store):
    other, never = AdapterId.of("acme", "other"), AdapterId.of("acme", "never")
    await store.put(ID, b"1", META)
    await store.put(ID, b"2", META)
    await store.put(other, b"x", META)
    await store.delete(other)
    assert await store.versions([ID, other, never]) == {ID: 2, other: None, never: None}
    assert await store.versions([]) == {}


async def test_unknown_adapter_is_not_found(store):
    unknown = AdapterId.of("acme", "nope")
    for call in (store.get_info(unknown), store.get_blob(unknown), store.delete(unknown)):
        with pytest.raises(AdapterNotFound):
            await call


async def test_concurrent_writers_never_expose_a_torn_or_mismatched_blob(store):
    writers, puts = 4, 20
    blobs = {(w, i): make_blob(1000 * w + i, 200_000) for w in range(writers) for i in range(puts)}
    hashes = {sha(b) for b in blobs.values()}
    written, reads, done = [], [], asyncio.Event()

    async def writer(w: int):
        for i in range(puts):
            written.append(await store.put(ID, blobs[w, i], META))

    async def reader():
        while not done.is_set():
            puts_done = len(written)
            try:
                info, data = await store.get_blob(ID)
            except AdapterNotFound:
                assert puts_done == 0, "an adapter with a stored version must be found"
                await asyncio.sleep(0)
                continue
            assert sha(data) == info.sha256 and info.sha256 in hashes
            reads.append((info.version, info.sha256))

    async def writers_then_stop():
        await asyncio.gather(*(writer(w) for w in range(writers)))
        done.set()

    await asyncio.gather(writers_then_stop(), reader())

    assert sorted(i.version for i in written) == list(range(1, writers * puts + 1))
    by_version = {i.version: i.sha256 for i in written}
    assert sorted(by_version.values()) == sorted(hashes)  # every blob stored exactly once
    assert all(by_version[v] == h for v, h in reads), "a read paired a version with another version's bytes"
    assert len({v for v, _ in reads}) > 1, "the reader never overlapped the writers"
    final, data = await store.get_blob(ID)
    assert final.version == writers * puts and sha(data) == by_version[final.version]


def _write_from_process(url: str, seed: int, n: int, barrier, results) -> None:
    async def main():
        s = open_store(url)
        barrier.wait(timeout=30)
        out = [(await s.put(ID, make_blob(seed + i, 50_000), META)) for i in range(n)]
        await s.close()
        return [(i.version, i.sha256) for i in out]

    try:
        results.put(asyncio.run(main()))
    except BaseException as e:
        results.put(f"writer {seed} failed: {e!r}")
        raise


async def test_writers_in_separate_processes_get_distinct_versions(store):
    ctx, n = multiprocessing.get_context("spawn"), 20
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = [(store.url, seed, n, barrier, results) for seed in (0, 500)]
    procs = [ctx.Process(target=_write_from_process, args=a) for a in args]
    for p in procs:
        p.start()
    try:
        got = await asyncio.to_thread(lambda: [results.get(timeout=60) for _ in procs])
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(isinstance(out, list) for out in got), got
    versions = sorted(v for out in got for v, _ in out)
    assert versions == list(range(1, 2 * n + 1))
    assert all([v for v, _ in out] == sorted(v for v, _ in out) for out in got)
    by_version = dict(pair for out in got for pair in out)
    info, data = await store.get_blob(ID)
    assert info.version == 2 * n and sha(data) == by_version[2 * n]
    for v in (2 * n - 1, 2 * n):
        assert (await store.get_blob(ID, version=v))[0].sha256 == by_version[v]


# --- local directory only ---------------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def local(root) -> LocalDirStore:
    return open_store(f"file://{root}")


async def test_corrupted_blob_raises_integrity_error(local, root):
    await local.put(ID, make_blob(5), META)
    path = root / "acme" / "sentiment" / "v1.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        await local.get_blob(ID)
    with pytest.raises(IntegrityError):
        await local.get_blob(ID, version=1)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(IntegrityError):
        await local.get_blob(ID)


async def test_current_naming_a_missing_blob_is_an_integrity_error(local, root):
    await local.put(ID, make_blob(6), META)
    (root / "acme" / "sentiment" / "v1.safetensors").unlink()
    with pytest.raises(IntegrityError):
        await local.get_blob(ID)


async def test_layout_and_pruning_of_old_versions(local, root):
    for i in range(5):
        last = await local.put(ID, make_blob(i), META)
    d = root / "acme" / "sentiment"
    assert json.loads((d / "current.json").read_text()) == last.to_json()
    kept = {f"v{v}.{ext}" for v in (3, 4, 5) for ext in ("safetensors", "json")}
    assert set(os.listdir(d)) == kept | {"current.json", ".next_version", ".lock"}
    for v in (1, 2):
        with pytest.raises(AdapterNotFound):
            await local.get_blob(ID, version=v)
    assert (await local.get_blob(ID, version=3))[1] == make_blob(2)
    await local.delete(ID)
    assert set(os.listdir(d)) == {".next_version", ".lock"}


async def test_list_skips_directories_that_are_not_adapters(local, root):
    await local.put(ID, b"x", META)
    (root / "acme" / "empty").mkdir()
    (root / "acme" / ".hidden").mkdir()
    (root / "acme" / "stray-file").write_text("not an adapter")
    (root / "Bad Tenant" / "x").mkdir(parents=True)
    (root / "acme\n" / "x").mkdir(parents=True)  # "$" would let a final newline through
    (root / "acme" / "nl\n").mkdir()
    assert [i.id for i in (await local.list()).items] == ["acme/sentiment"]


@pytest.mark.parametrize("tenant,name", [("acme\n", "x"), ("acme", "x\n"), ("acme", "x\r"), ("\nacme", "x"),
                                         ("acme", "x\n\n"), ("acme\x00", "x"), ("acme", "x\x1b")])
def test_ids_with_control_characters_are_invalid(tenant, name):
    with pytest.raises(InvalidAdapterId):
        AdapterId.of(tenant, name)
    with pytest.raises(InvalidAdapterId):
        AdapterId.parse(f"{tenant}/{name}")
    assert AdapterId.of(tenant.strip("\n\r\x00"), name.strip("\n\r\x1b")) == AdapterId("acme", "x")


@pytest.mark.parametrize("form", ["abs", "rel", "bare"])
async def test_url_forms(form, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = {"abs": f"file://{tmp_path}/s", "rel": "file://./s", "bare": "s"}[form]
    s = open_store(url)
    assert isinstance(s, LocalDirStore) and s.root == tmp_path / "s" and s.root.is_dir()
    await s.ping()
    assert open_store(s.url).root == s.root


async def test_ping_fails_when_root_is_gone_or_not_a_directory(local, root):
    await local.ping()
    shutil.rmtree(root)
    with pytest.raises(StoreUnavailable):
        await local.ping()
    root.write_text("a file where the store should be")
    with pytest.raises(StoreUnavailable):
        await local.ping()
    with pytest.raises(StoreUnavailable):
        await local.put(ID, b"x", META)


async def test_paths_never_leave_the_root(local, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(InvalidAdapterId):
        await local.put(AdapterId("..", "outside"), b"x", META)  # bypasses AdapterId.of's checks
    (root / "evil").symlink_to(outside)
    with pytest.raises(InvalidAdapterId):
        await local.put(AdapterId.of("evil", "x"), b"x", META)
    assert os.listdir(outside) == []
