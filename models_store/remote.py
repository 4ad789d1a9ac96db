"""The shared model store: finished models published under an fsspec URL for every host.

``CSRA_MODEL_STORE_URL`` empty (the default): nothing here is used; the data dir's ``models``
folder is the store, as on one machine. Set (``s3://bucket/models``, ``gs://bucket/models``,
``file:///mnt/shared/models``): a finished model is published to ``<url>/<name>/`` and a worker on
any host fetches it into its own ``models`` folder, the bounded local cache (``models_store.cache``).

Layout of one model in the store::

    <url>/<name>/<publish id>/config.json, model.safetensors, tokenizer.json, ...
    <url>/<name>/manifest.json     {"publish_id", "content_hash", "files": {path: {"sha256", "size"}}}
    <url>/<name>/exports/<model>-f16.gguf, <model>-f16.gguf.json   a GGUF export and its record
                                   {"file", "sha256", "size", "content_hash" (of the weights it came from)}

An export is published after the model, by the host that made it (``POST /models/{ref}/export``); its
record is written last (the commit point, as the manifest is for the model) and names the weights it
was made from, so an export of an older model of the same name is never served.

Torch-free on purpose (the API deletes models from the store; it never imports torch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from csra.jobctx import JobError, TransientJobError
from csra.specs import EXPORTS_DIR

logger = logging.getLogger(__name__)

SETTING = "CSRA_MODEL_STORE_URL"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 1 << 20


class ModelStoreError(TransientJobError):
    """The store could not be reached or read (it disappeared mid-run, credentials expired...)."""


class ModelStoreUnreachable(ModelStoreError):
    """The store is not there at start: the process exits with this message (it names the setting)."""


class ModelHashMismatch(JobError):
    """A downloaded model is not what was published: it is refused, never loaded."""


class ModelNotPublished(JobError):
    """The registry has the model but the store has no (committed) copy of it."""


# --------------------------------------------------------------------------- content hashes


def weight_files(folder: Path) -> list[Path]:
    """A model folder's weight files in hashing order (safetensors, else ``pytorch_model*.bin``)."""
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("pytorch_model*.bin"))


def files_sha256(files: Iterable[Path], chunk: int = CHUNK) -> str:
    """One sha256 over the files' bytes, in order: the registry's ``content_hash`` of a model."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def content_hash(folder: Path) -> str:
    return files_sha256(weight_files(folder))


def model_files(folder: Path) -> list[str]:
    """What is published of a model folder: every file but hidden ones and its GGUF ``exports``."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] != EXPORTS_DIR and not any(p.startswith(".") for p in rel.parts):
            out.append(rel.as_posix())
    return out


# --------------------------------------------------------------------------- the store


def redact(url: str) -> str:
    """``url`` without a password (``s3://key:secret@host/...`` never reaches a log or a job error)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RemoteStore:
    """One model store URL, read and written through fsspec (``s3fs``/``gcsfs`` for s3:// and gs://)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.shown = redact(self.url)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:  # unknown protocol, or its package (s3fs, gcsfs) missing
            raise ModelStoreUnreachable(
                f"the model store {SETTING}={self.shown} cannot be opened: {exc}") from exc
        self.root = self.root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _unavailable(self, doing: str, exc: BaseException) -> ModelStoreError:
        return ModelStoreError(
            f"the model store {SETTING}={self.shown} failed while {doing} ({type(exc).__name__}: {exc}); "
            "check that the store is reachable and retry the job")

    def check(self) -> None:
        """Raise ``ModelStoreUnreachable`` (naming the setting) unless the store's root can be listed.

        A ``file://`` root must already exist: a shared mount that is not mounted must not turn into
        an empty local folder that only this host can see.
        """
        try:
            if self.local:
                if not self.fs.isdir(self.root):
                    raise FileNotFoundError(f"{self.root} is not a folder (is the shared mount mounted?)")
            else:
                try:
                    self.fs.ls(self.root, detail=False)
                except FileNotFoundError:  # an empty prefix does not exist in an object store: its bucket must
                    self.fs.ls(self.root.lstrip("/").split("/", 1)[0], detail=False)
        except Exception as exc:  # noqa: BLE001 - every backend raises its own errors (botocore, google.auth)
            raise ModelStoreUnreachable(
                f"the model store {SETTING}={self.shown} is unreachable: {type(exc).__name__}: {exc}. "
                f"Fix the URL or its credentials, or leave {SETTING} empty to keep models in the data dir "
                "(one machine)") from exc

    # ----------------------------------------------------------------------- reading

    def manifest(self, name: str) -> dict[str, Any] | None:
        """The committed manifest of model ``name``; None when it is not published."""
        try:
            raw = self.fs.cat_file(self._path(name, MANIFEST))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - backend errors
            raise self._unavailable(f"reading the manifest of model {name!r}", exc) from exc
        return dict(json.loads(raw))

    def names(self) -> list[str]:
        """Every model published in the store (those with a manifest)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable("listing the models", exc) from exc
        names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if self.fs.exists(self._path(n, MANIFEST)))

    def fetch(self, name: str, dest: Path, expected_hash: str | None) -> dict[str, Any]:
        """Download model ``name`` into the new folder ``dest``, verifying every file's sha256.

        A file whose hash differs from the manifest, or weights whose content hash differs from
        ``expected_hash`` (the registry row's), refuse the model: ``dest`` is deleted and
        ``ModelHashMismatch`` raised, so the copy is never loaded. Returns the manifest.
        """
        manifest = self.manifest(name)
        if manifest is None:
            raise ModelNotPublished(
                f"model {name!r} is registered but not in the model store {SETTING}={self.shown} (deleted, or "
                f"registered before {SETTING} was set: publish it from the host that has it)")
        if expected_hash and manifest.get("content_hash") != expected_hash:
            raise ModelHashMismatch(
                f"model {name!r} in the model store has content hash {manifest.get('content_hash')}, but the "
                f"registry says {expected_hash}: refused (re-published under the same name?)")
        try:
            self._download(name, manifest, dest)
            got = content_hash(dest)
            if got != manifest.get("content_hash"):
                raise ModelHashMismatch(f"model {name!r} downloaded from the model store has content hash {got}, "
                                        f"not the published {manifest.get('content_hash')}: refused")
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return manifest

    def _download(self, name: str, manifest: dict[str, Any], dest: Path) -> None:
        prefix = self._path(name, str(manifest["publish_id"]))
        for rel, info in manifest["files"].items():
            target = dest / rel
            if not target.resolve().is_relative_to(dest.resolve()):
                raise ModelHashMismatch(f"model {name!r} in the model store names a file outside its folder: {rel}")
            target.parent.mkdir(parents=True, exist_ok=True)
            self._download_file(name, f"{prefix}/{rel}", rel, target, str(info["sha256"]))

    def _download_file(self, name: str, remote: str, shown: str, target: Path, sha256: str) -> None:
        """Copy ``remote`` to ``target``; ``ModelHashMismatch`` unless its bytes hash to ``sha256``."""
        digest = hashlib.sha256()
        try:
            with self.fs.open(remote, "rb") as src, open(target, "wb") as out:
                while block := src.read(CHUNK):
                    digest.update(block)
                    out.write(block)
        except Exception as exc:  # noqa: BLE001 - backend errors
            raise self._unavailable(f"downloading {shown} of model {name!r}", exc) from exc
        if digest.hexdigest() != sha256:
            raise ModelHashMismatch(
                f"model {name!r}: {shown} downloaded from the model store has sha256 {digest.hexdigest()}, not "
                f"the published {sha256}: refused (a corrupt or tampered copy)")

    # ----------------------------------------------------------------------- writing

    def publish(self, name: str, folder: Path, hash_: str | None = None) -> dict[str, Any]:
        """Upload model folder ``folder`` as ``name``; it becomes visible all at once.

        Object stores have no rename, so a folder cannot be uploaded under a temporary name and
        renamed into place. Instead the files go under a fresh prefix (``<name>/<publish id>/``)
        that no reader looks at, and the manifest, which lists them with their hashes, is written
        last: its presence is the commit point. A reader sees either no manifest (not published)
        or a manifest whose files are all there; an upload that dies halfway leaves only an
        unreferenced prefix behind, which the next publish or delete of that name removes.
        """
        publish_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        files: dict[str, dict[str, Any]] = {}
        prefix = self._path(name, publish_id)
        try:
            for rel in model_files(folder):
                digest = files_sha256([folder / rel])
                remote = f"{prefix}/{rel}"
                self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(folder / rel), remote)
                files[rel] = {"sha256": digest, "size": (folder / rel).stat().st_size}
            manifest = {"format": MANIFEST_FORMAT, "name": name, "publish_id": publish_id,
                        "content_hash": hash_ or content_hash(folder), "published_at": time.time(),
                        "size_bytes": sum(f["size"] for f in files.values()), "files": files}
            self._write_manifest(name, manifest)
        except Exception as exc:  # noqa: BLE001 - backend errors
            self._remove_prefix(name, publish_id)
            raise self._unavailable(f"publishing model {name!r}", exc) from exc
        self._remove_stale(name, keep=publish_id)
        logger.info("published model %s to %s/%s (%s)", name, self.shown, name, publish_id)
        return manifest

    def _write_manifest(self, name: str, manifest: dict[str, Any]) -> None:
        self._write_json(self._path(name, MANIFEST), manifest)

    def _write_json(self, final: str, record: dict[str, Any]) -> None:
        data = json.dumps(record, indent=1).encode()
        if self.local:  # a shared mount: a plain write could be read half-written; rename is atomic there
            folder, leaf = final.rsplit("/", 1)
            tmp = f"{folder}/.{leaf}.{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        else:  # one PUT: an object appears whole or not at all
            self.fs.pipe_file(final, data)

    # ----------------------------------------------------------------------- GGUF exports

    def publish_export(self, name: str, file: Path, content_hash: str | None) -> dict[str, Any]:
        """Upload ``file``, a GGUF export of model ``name`` made from the weights ``content_hash``; its
        record is written last, so a reader sees the export whole or not at all."""
        record = {"file": file.name, "sha256": files_sha256([file]), "size": file.stat().st_size,
                  "content_hash": content_hash, "published_at": time.time()}
        final = self._path(name, EXPORTS_DIR, file.name)
        try:
            self.fs.makedirs(self._path(name, EXPORTS_DIR), exist_ok=True)
            if self.local:  # a copy under a hidden name, renamed: never a half-written file under the real one
                tmp = self._path(name, EXPORTS_DIR, f".{file.name}.{uuid.uuid4().hex}")
                self.fs.put_file(str(file), tmp)
                self.fs.mv(tmp, final)
            else:
                self.fs.put_file(str(file), final)
            self._write_json(f"{final}.json", record)
        except Exception as exc:  # noqa: BLE001 - backend errors
            raise self._unavailable(f"publishing {file.name} of model {name!r}", exc) from exc
        logger.info("published %s of model %s to %s", file.name, name, self.shown)
        return record

    def exports(self, name: str, content_hash: str | None) -> dict[str, dict[str, Any]]:
        """The published exports of model ``name`` made from the weights ``content_hash``, by file name."""
        folder = self._path(name, EXPORTS_DIR)
        try:
            entries = [str(e) for e in self.fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(f"listing the exports of model {name!r}", exc) from exc
        found: dict[str, dict[str, Any]] = {}
        for entry in entries:
            leaf = entry.rstrip("/").rsplit("/", 1)[-1]
            if not leaf.endswith(".gguf.json") or leaf.startswith("."):
                continue
            try:
                record = dict(json.loads(self.fs.cat_file(f"{folder}/{leaf}")))
            except FileNotFoundError:  # removed meanwhile (the model was deleted)
                continue
            except Exception as exc:  # noqa: BLE001
                raise self._unavailable(f"reading {leaf} of model {name!r}", exc) from exc
            if record.get("file") == leaf[: -len(".json")] and (
                    content_hash is None or record.get("content_hash") == content_hash):
                found[str(record["file"])] = record
        return found

    def fetch_export(self, name: str, record: dict[str, Any], dest: Path) -> None:
        """Download the export ``record`` of model ``name`` to ``dest``, verified against its sha256 (a
        mismatch raises ``ModelHashMismatch`` and leaves nothing at ``dest``)."""
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        file = str(record["file"])
        try:
            self._download_file(name, self._path(name, EXPORTS_DIR, file), file, tmp, str(record["sha256"]))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def open_export(self, name: str, file: str) -> Any:
        """A binary file object reading the published export ``file`` of model ``name``."""
        try:
            return self.fs.open(self._path(name, EXPORTS_DIR, file), "rb")
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(f"opening {file} of model {name!r}", exc) from exc

    def _remove_prefix(self, name: str, publish_id: str) -> None:
        try:
            if self.fs.exists(self._path(name, publish_id)):
                self.fs.rm(self._path(name, publish_id), recursive=True)
        except Exception:  # noqa: BLE001 - best effort: an unreferenced prefix is never read
            logger.warning("could not remove %s/%s/%s from the model store", self.shown, name, publish_id,
                           exc_info=True)

    def _remove_stale(self, name: str, keep: str) -> None:
        """Remove the prefixes of ``name`` that its manifest does not name (older or failed uploads)."""
        try:
            entries = self.fs.ls(self._path(name), detail=False)
        except Exception:  # noqa: BLE001
            return
        for entry in entries:
            leaf = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if leaf not in (keep, MANIFEST, EXPORTS_DIR) and not leaf.startswith("."):
                self._remove_prefix(name, leaf)

    def delete(self, name: str, publish_id: str | None = None) -> bool:
        """Unpublish ``name`` (the manifest first: from then on no host fetches it), then its files.

        ``publish_id``: only if the manifest is still that publication (a failed registration must
        not remove the model another host published under the same name meanwhile).
        """
        manifest = None
        try:
            manifest = self.manifest(name)
            if manifest is not None and publish_id is not None and manifest.get("publish_id") != publish_id:
                self._remove_prefix(name, publish_id)
                return False
            if manifest is not None:
                self.fs.rm(self._path(name, MANIFEST))
            if self.fs.exists(self._path(name)):
                self.fs.rm(self._path(name), recursive=True)
        except ModelStoreError:
            raise
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._unavailable(f"deleting model {name!r}", exc) from exc
        return manifest is not None


def store_from_settings() -> RemoteStore | None:
    """The configured shared store, or None on a single machine (``CSRA_MODEL_STORE_URL`` empty)."""
    from csra.settings import get_settings

    url = get_settings().model_store_url
    return RemoteStore(url) if url else None


def check_store_at_start() -> None:
    """Raise ``ModelStoreUnreachable`` (its text names ``CSRA_MODEL_STORE_URL``) if the store is set but
    cannot be reached. Called by every ``csra`` process that reads or writes models, before it starts."""
    store = store_from_settings()
    if store is not None:
        store.check()
