"""The shared model store through a file:// URL in a tmp dir, and this host's bounded cache of it.

No torch and no database here: a "model" is a folder of plain files (the store only hashes bytes).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from models_store import cache
from models_store.remote import (
    MANIFEST,
    ModelHashMismatch,
    ModelNotPublished,
    ModelStoreError,
    ModelStoreUnreachable,
    RemoteStore,
    content_hash,
    redact,
)


def fake_model(folder: Path, weights: bytes = b"w" * 1000) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "exports").mkdir()
    (folder / "exports" / "m-f16.gguf").write_bytes(b"not published")
    return folder


@pytest.fixture()
def store(tmp_path: Path) -> RemoteStore:
    root = tmp_path / "shared"
    root.mkdir()
    return RemoteStore(f"file://{root}")


def test_publish_then_fetch_on_another_host(store: RemoteStore, tmp_path: Path) -> None:
    src = fake_model(tmp_path / "a" / "m1")
    manifest = store.publish("m1", src)
    assert manifest["content_hash"] == content_hash(src)
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}  # no exports
    assert store.names() == ["m1"]

    host_b = tmp_path / "b" / "models"
    got = cache.local_copy(store, host_b, "m1", manifest["content_hash"], bound_bytes=10**9)
    assert got == (host_b / "m1").resolve()
    assert (got / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    entry = cache.read_entry(host_b, "m1")
    assert entry is not None and entry.source == "fetched" and entry.publish_id == manifest["publish_id"]
    # the second use reads the marker only: the store is not touched (it may even be gone)
    store.fs.rm(store.root, recursive=True)
    assert cache.local_copy(store, host_b, "m1", manifest["content_hash"], bound_bytes=10**9) == got


def test_a_model_becomes_visible_only_with_its_manifest(store: RemoteStore, tmp_path: Path) -> None:
    src = fake_model(tmp_path / "m")
    manifest = store.publish("m", src)
    Path(store.root, "m", MANIFEST).unlink()  # as if the upload died before its commit point
    assert store.manifest("m") is None and store.names() == []
    with pytest.raises(ModelNotPublished, match="not in the model store"):
        store.fetch("m", tmp_path / "dest", manifest["content_hash"])
    # a new publication removes the unreferenced files of the dead one
    again = store.publish("m", src)
    assert sorted(p.name for p in Path(store.root, "m").iterdir()) == sorted([MANIFEST, again["publish_id"]])


def test_a_corrupt_download_is_refused_and_nothing_is_kept(store: RemoteStore, tmp_path: Path) -> None:
    src = fake_model(tmp_path / "m")
    manifest = store.publish("m", src)
    weights = Path(store.root, "m", manifest["publish_id"], "model.safetensors")
    weights.write_bytes(b"x" * 1000)  # same size, other bytes
    host_b = tmp_path / "b"
    with pytest.raises(ModelHashMismatch, match="model.safetensors .*refused"):
        cache.local_copy(store, host_b, "m", manifest["content_hash"], bound_bytes=10**9)
    assert not (host_b / "m").exists() and cache.entries(host_b) == []
    assert not [p for p in host_b.iterdir() if p.name.startswith(".m.fetch")]


def test_a_store_copy_that_is_not_the_registered_model_is_refused(store: RemoteStore, tmp_path: Path) -> None:
    store.publish("m", fake_model(tmp_path / "m"))
    with pytest.raises(ModelHashMismatch, match="registry says"):
        cache.local_copy(store, tmp_path / "b", "m", "0" * 64, bound_bytes=10**9)
    assert not (tmp_path / "b" / "m").exists()


def test_a_stale_copy_is_replaced_when_the_name_is_reused(store: RemoteStore, tmp_path: Path) -> None:
    host_b = tmp_path / "b"
    old = store.publish("m", fake_model(tmp_path / "v1", b"1" * 100))
    cache.local_copy(store, host_b, "m", old["content_hash"], bound_bytes=10**9)
    new = store.publish("m", fake_model(tmp_path / "v2", b"2" * 100))
    got = cache.local_copy(store, host_b, "m", new["content_hash"], bound_bytes=10**9)
    assert (got / "model.safetensors").read_bytes() == b"2" * 100


def test_delete_removes_the_model_from_the_store_and_the_caches(store: RemoteStore, tmp_path: Path) -> None:
    manifest = store.publish("m", fake_model(tmp_path / "m"))
    host_b, host_c = tmp_path / "b", tmp_path / "c"
    for host in (host_b, host_c):
        cache.local_copy(store, host, "m", manifest["content_hash"], bound_bytes=10**9)
    assert store.delete("m") is True
    assert store.manifest("m") is None and not Path(store.root, "m").exists()
    assert cache.remove(host_b, "m") is True  # the deleting host drops its copy at once
    assert not (host_b / "m").exists() and cache.read_entry(host_b, "m") is None
    # another host drops its copy once it sees the model is no longer registered
    assert cache.prune(host_c, registered={}, now=time.time()) == []  # just used: it waits
    assert cache.prune(host_c, registered={}, now=time.time() + cache.IN_USE_SECONDS + 1) == ["m"]
    assert not (host_c / "m").exists()


def test_a_failed_registration_removes_only_its_own_publication(store: RemoteStore, tmp_path: Path) -> None:
    mine = store.publish("m", fake_model(tmp_path / "mine", b"1" * 10))
    theirs = store.publish("m", fake_model(tmp_path / "theirs", b"2" * 10))
    assert store.delete("m", publish_id=mine["publish_id"]) is False
    assert store.manifest("m") == theirs


def test_the_cache_keeps_to_its_bound_least_recently_used_first(store: RemoteStore, tmp_path: Path) -> None:
    host = tmp_path / "b"
    hashes = {}
    for name in ("m1", "m2", "m3"):
        hashes[name] = store.publish(name, fake_model(tmp_path / "src" / name, name.encode() * 500))["content_hash"]
    size = sum(f.stat().st_size for f in (tmp_path / "src" / "m1").iterdir() if f.is_file())
    long_ago = time.time() - 10 * cache.IN_USE_SECONDS
    for i, name in enumerate(("m1", "m2")):
        cache.local_copy(store, host, name, hashes[name], bound_bytes=10 * size)
        os.utime(cache._marker(host, name), (long_ago + i, long_ago + i))  # m1 least recently used
    local = host / "local-only"  # a model that exists only here is never evicted
    local.mkdir()
    cache.write_entry(host, "local-only", content_hash=None, publish_id=None, source="local", size_bytes=size)
    os.utime(cache._marker(host, "local-only"), (long_ago - 5, long_ago - 5))

    cache.local_copy(store, host, "m3", hashes["m3"], bound_bytes=int(3.5 * size))  # 4 copies: one must go
    assert sorted(e.name for e in cache.entries(host)) == ["local-only", "m2", "m3"]
    assert not (host / "m1").exists()
    # the one in use is never evicted, even when it alone is over the bound
    cache.local_copy(store, host, "m1", hashes["m1"], bound_bytes=size // 2)
    assert (host / "m1").is_dir() and (host / "m3").is_dir()  # m3 was used just now: kept too
    assert not (host / "m2").exists()


def test_a_model_folder_made_before_the_store_was_set_is_adopted_and_published(
        store: RemoteStore, tmp_path: Path) -> None:
    host = tmp_path / "a"
    src = fake_model(host / "m")
    h = content_hash(src)
    assert cache.local_copy(store, host, "m", h, bound_bytes=10**9) == src.resolve()
    assert store.manifest("m")["content_hash"] == h  # type: ignore[index]
    assert cache.read_entry(host, "m").source == "published"  # type: ignore[union-attr]


def test_an_unreachable_store_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreUnreachable, match="CSRA_MODEL_STORE_URL=file://.*is unreachable"):
        RemoteStore(f"file://{tmp_path}/not-mounted").check()
    with pytest.raises(ModelStoreUnreachable, match="CSRA_MODEL_STORE_URL=nosuchproto://x cannot be opened"):
        RemoteStore("nosuchproto://x")
    RemoteStore(f"file://{tmp_path}").check()  # there: fine


def test_a_store_that_disappears_mid_run_fails_with_a_clear_error(store: RemoteStore, tmp_path: Path) -> None:
    manifest = store.publish("m", fake_model(tmp_path / "m"))
    Path(store.root, "m", manifest["publish_id"], "tokenizer.json").unlink()  # part of the store went away
    with pytest.raises(ModelStoreError, match="CSRA_MODEL_STORE_URL=.*failed while downloading tokenizer.json"):
        cache.local_copy(store, tmp_path / "b", "m", manifest["content_hash"], bound_bytes=10**9)
    assert not (tmp_path / "b" / "m").exists()


def test_credentials_never_show_in_messages() -> None:
    assert redact("s3://key:secret@minio:9000/models") == "s3://key:***@minio:9000/models"
    assert redact("gs://bucket/models") == "gs://bucket/models"


def test_an_object_store_without_rename_works_the_same(tmp_path: Path) -> None:
    """fsspec's in-memory filesystem stands in for s3:// / gs://: no rename, the manifest is one write."""
    import uuid

    url = f"memory://csra-test-{uuid.uuid4().hex[:8]}/models"
    store = RemoteStore(url)
    assert not store.local
    store.fs.mkdir(url.removeprefix("memory://").split("/")[0])  # the bucket
    store.check()  # an empty prefix of an existing bucket is reachable
    manifest = store.publish("m", fake_model(tmp_path / "m"))
    got = cache.local_copy(store, tmp_path / "b", "m", manifest["content_hash"], bound_bytes=10**9)
    assert (got / "config.json").is_file()
    store.publish_export("m", tmp_path / "m" / "exports" / "m-f16.gguf", manifest["content_hash"])
    assert cache.local_exports(store, got, "m", manifest["content_hash"]) == [got / "exports" / "m-f16.gguf"]
    assert store.delete("m") and store.names() == []


# --------------------------------------------------------------------------- GGUF exports


def test_an_export_is_published_for_every_host_with_the_weights_it_came_from(
        store: RemoteStore, tmp_path: Path) -> None:
    src = fake_model(tmp_path / "a" / "m")
    h = store.publish("m", src)["content_hash"]
    gguf = src / "exports" / "m-f16.gguf"
    assert store.exports("m", h) == {}
    (Path(store.root) / "m" / "exports").mkdir()
    (Path(store.root) / "m" / "exports" / "m-q8_0.gguf").write_bytes(b"half an upload")  # no record: not there
    record = store.publish_export("m", gguf, h)
    assert set(store.exports("m", h)) == {"m-f16.gguf"} and record["size"] == len(b"not published")

    host_b = tmp_path / "b"
    folder = cache.local_copy(store, host_b, "m", h, bound_bytes=10**9)
    assert not (folder / "exports").exists()  # the model alone: exports come when llama.cpp needs them
    assert cache.local_exports(store, folder, "m", h) == [folder / "exports" / "m-f16.gguf"]
    assert (folder / "exports" / "m-f16.gguf").read_bytes() == gguf.read_bytes()
    assert cache.local_exports(store, folder, "m", h) == []  # already here: nothing downloaded

    # the name reused for other weights: the old export is not theirs, and the republish keeps the folder
    h2 = store.publish("m", fake_model(tmp_path / "a2" / "m", b"other" * 10))["content_hash"]
    assert store.exports("m", h2) == {} and set(store.exports("m", h)) == {"m-f16.gguf"}
    assert store.delete("m") and not (Path(store.root) / "m").exists()
    assert store.exports("m", h) == {}


def test_a_corrupt_export_is_refused_and_nothing_is_kept(store: RemoteStore, tmp_path: Path) -> None:
    src = fake_model(tmp_path / "a" / "m")
    h = store.publish("m", src)["content_hash"]
    store.publish_export("m", src / "exports" / "m-f16.gguf", h)
    (Path(store.root) / "m" / "exports" / "m-f16.gguf").write_bytes(b"tampered")
    folder = cache.local_copy(store, tmp_path / "b", "m", h, bound_bytes=10**9)
    with pytest.raises(ModelHashMismatch, match="m-f16.gguf downloaded from the model store has sha256"):
        cache.local_exports(store, folder, "m", h)
    assert list((folder / "exports").iterdir()) == []


def test_a_copy_with_an_export_the_store_lacks_is_never_evicted(store: RemoteStore, tmp_path: Path) -> None:
    host = tmp_path / "b"
    h = store.publish("m", fake_model(tmp_path / "src" / "m"))["content_hash"]
    folder = cache.local_copy(store, host, "m", h, bound_bytes=10**9)
    (folder / "exports").mkdir()
    made_here = folder / "exports" / "m-q8_0.gguf"
    made_here.write_bytes(b"exported on this host before the store held exports")
    long_ago = time.time() - 10 * cache.IN_USE_SECONDS
    os.utime(cache._marker(host, "m"), (long_ago, long_ago))
    assert cache.evict(host, bound_bytes=1, keep=set()) == [] and folder.is_dir()
    store.publish_export("m", made_here, h)
    cache.mark_stored(made_here)  # what publishing from this host records
    assert cache.evict(host, bound_bytes=1, keep=set()) == ["m"] and not folder.exists()
