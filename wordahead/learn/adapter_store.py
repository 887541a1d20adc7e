"""Versioned LoRA adapters under the keyboard home: atomic promotion, rollback, export/import."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wordahead import paths
from wordahead.model.artifacts import (
    Adapter,
    ArtifactError,
    ArtifactSet,
    check_adapter,
    load_adapter,
    tensors_sha256,
    write_atomic,
    write_npz,
)
from wordahead.paths import Home
from wordahead.types import KeyboardError

log = logging.getLogger("keyboard.adapters")

BASE = "base"  # the model's initial adapter: what "no personalization" means
ACTIVE_FILE = "ACTIVE"
ADAPTER_FILE = "adapter.npz"
META_FILE = "meta.json"
PHRASES_FILE = "phrases.zlib"  # the user's word n-grams (wordahead.predict.sources.phrases), when the job made them
DEFAULT_KEEP = 5
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class AdapterStoreError(KeyboardError):
    """An adapter version that is missing, corrupt, or does not fit the model."""


def version_name(version: str) -> str:
    """The stored name of `version`: "v0003" for "3" or "v3", "base" for base, initial or none."""
    v = version.strip()
    if v.lower() in (BASE, "initial", "none"):
        return BASE
    if v.isdigit():
        v = f"v{int(v):04d}"
    if not _VERSION_RE.match(v):
        raise AdapterStoreError(f"not an adapter version: {version!r} (e.g. v0003 or base)")
    return v


def model_fingerprint(artifacts: ArtifactSet) -> str:
    """What an adapter is only valid for: the base weights, the LoRA layout, the initial tensors.

    Two exports of the same base model with the same LoRA settings and seed share it, so
    adapters (and diffs) move between machines that have the same starter model.
    """
    manifest = artifacts.manifest
    identity = {
        "base_sha256": manifest["base_model"].get("sha256"),
        "lora": {k: manifest["lora"].get(k) for k in ("rank", "alpha", "tensors")},
        "initial": tensors_sha256(artifacts.initial_adapter()),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def forget_phrases(home: Home) -> int:
    """Delete the phrase files of every version of every model in `home` (after `keyboard
    forget`, so no n-gram of forgotten text outlives it; the next job rebuilds them from what
    the log still holds). Returns how many were deleted."""
    removed = 0
    for path in home.adapters.glob(f"*/v*/{PHRASES_FILE}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
            _fsync_dir(path.parent)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    """A new file only the user can read (0600 whatever the umask: phrases are their words)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    write_npz(buffer, arrays)
    return buffer.getvalue()


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class AdapterVersion:
    """One stored version: its name ("v0003"), directory and metadata."""

    version: str
    path: Path  # the adapter.npz file
    metadata: dict[str, Any]

    @property
    def number(self) -> int:
        return int(self.version[1:])


class AdapterStore:
    """Adapter versions of one model: `<root>/v0001/{adapter.npz, meta.json}` plus an ACTIVE
    pointer. Every change is write-to-temp, fsync, rename, so a crash or kill -9 at any moment
    leaves the active adapter complete and loadable.

    A home keeps one store per model (`in_home`): `adapters/<model name>-<fingerprint>`, so
    adapters of another model (or another export of it) are kept apart, never loaded into a
    model they do not fit.
    """

    def __init__(
        self, root: str | Path, artifacts: ArtifactSet | str | Path, fingerprint: str = ""
    ) -> None:
        if not isinstance(artifacts, ArtifactSet):
            artifacts = ArtifactSet.open(artifacts)
        self.artifacts = artifacts
        self.fingerprint = fingerprint or model_fingerprint(artifacts)
        self.root = paths.private_dir(Path(root))

    @classmethod
    def in_home(cls, home: Home, artifacts: ArtifactSet | str | Path) -> AdapterStore:
        """The store of `artifacts`' adapters in `home`."""
        if not isinstance(artifacts, ArtifactSet):
            artifacts = ArtifactSet.open(artifacts)
        fingerprint = model_fingerprint(artifacts)
        root = home.adapters / f"{artifacts.name}-{fingerprint[:12]}"
        return cls(root, artifacts, fingerprint)

    # --- locking ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise changes between processes (a job promoting, the CLI switching versions).

        flock is released by the kernel when the holder dies, so a crash never leaves it stuck.
        """
        fd = paths.open_no_follow(self.root / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- reading ----------------------------------------------------------------------------
    def _version_dirs(self) -> list[Path]:
        found = [p for p in self.root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(found, key=lambda p: int(p.name[1:]))

    def _read_meta(self, version: str) -> dict[str, Any]:
        try:
            meta = json.loads((self.root / version / META_FILE).read_text())
        except Exception as exc:  # noqa: BLE001 - any damage (deep nesting: RecursionError)
            raise AdapterStoreError(f"adapter {version}: cannot read its metadata ({exc})") from exc
        if not isinstance(meta, dict):
            raise AdapterStoreError(f"adapter {version}: metadata is not a JSON object")
        return meta

    def get(self, version: str) -> AdapterVersion:
        """A stored version with its metadata (the tensors are not checked; see `load`)."""
        version = version_name(version)
        if not (self.root / version).is_dir():
            raise AdapterStoreError(f"no adapter version {version} (see `keyboard adapters list`)")
        return AdapterVersion(version, self.root / version / ADAPTER_FILE, self._read_meta(version))

    def load(self, version: str) -> Adapter:
        """The tensors of `version` ("base": the model's initial adapter), fully validated:
        names and shapes fit the model, values finite, content hash as recorded."""
        version = version_name(version)
        if version == BASE:
            return self.artifacts.initial_adapter()
        entry = self.get(version)
        if entry.metadata.get("model_fingerprint") not in (None, self.fingerprint):
            raise AdapterStoreError(f"adapter {version} was trained for another model")
        try:
            tensors = load_adapter(entry.path, self.artifacts)
        except ArtifactError as exc:
            raise AdapterStoreError(f"adapter {version} is damaged: {exc}") from exc
        expected = entry.metadata.get("tensors_sha256")
        if expected and tensors_sha256(tensors) != expected:
            raise AdapterStoreError(f"adapter {version} is damaged: its content hash differs")
        return tensors

    def phrases_path(self, version: str) -> Path | None:
        """The user phrase file of `version` (None: it has none, or it was forgotten). Its
        content is checked where it is loaded (wordahead.predict.sources.phrases.PhraseModel.load)."""
        version = version_name(version)
        path = self.root / version / PHRASES_FILE
        return path if version != BASE and path.is_file() else None

    def versions(self) -> list[AdapterVersion]:
        """All stored versions, oldest first (metadata {"error": ...} where it is unreadable)."""
        out = []
        for d in self._version_dirs():
            try:
                meta = self._read_meta(d.name)
            except AdapterStoreError as exc:
                meta = {"error": str(exc)}
            out.append(AdapterVersion(d.name, d / ADAPTER_FILE, meta))
        return out

    def _pointer(self) -> dict[str, Any]:
        """The ACTIVE file: {"version": "v0003" | "base", "previous": [older actives, newest
        first]}. Missing means base; unreadable is reported and read as base."""
        path = self.root / ACTIVE_FILE
        try:
            data = json.loads(path.read_text())
            version = version_name(str(data["version"]))
            previous = data.get("previous", [])
            if not isinstance(previous, list):
                raise TypeError(f"previous is {type(previous).__name__}, not a list")
            previous = [version_name(str(v)) for v in previous]
        except FileNotFoundError:
            return {"version": BASE, "previous": []}
        except Exception as exc:  # noqa: BLE001 - whatever the damage, fall back
            log.warning(
                "adapter pointer %s is unreadable (%s); using the newest good version", path, exc
            )
            newest = [d.name for d in reversed(self._version_dirs())]
            return {"version": newest[0] if newest else BASE, "previous": newest[1:]}
        return {"version": version, "previous": previous}

    @property
    def active_version(self) -> str:
        """The version the ACTIVE pointer names ("base" when none), without checking it."""
        return self._pointer()["version"]

    def active(self, problems: list[str] | None = None) -> tuple[str, Path, dict[str, Any]] | None:
        """(version, adapter path, metadata) of the adapter to serve; None means the base model.

        A damaged or missing active version is skipped with a warning in favour of the one
        active before it (then older versions, newest first), else the base model; the
        metadata's "fallback" says what happened, and `problems` (when given) receives why
        each skipped version was skipped.
        """
        pointer = self._pointer()
        wanted = pointer["version"]
        if wanted == BASE:
            return None
        candidates = [wanted] + pointer["previous"]
        candidates += [d.name for d in reversed(self._version_dirs()) if d.name not in candidates]
        problems = [] if problems is None else problems
        for version in candidates:
            if version == BASE:
                break
            try:
                self.load(version)
                entry = self.get(version)
            except AdapterStoreError as exc:
                problems.append(str(exc))
                continue
            meta = dict(entry.metadata)
            if problems:
                meta["fallback"] = f"{'; '.join(problems)}; serving {version} instead"
                log.warning("%s", meta["fallback"])
            return version, entry.path, meta
        if problems:
            log.warning("%s; serving the base model", "; ".join(problems))
        return None

    # --- changing ---------------------------------------------------------------------------
    def _set_pointer(self, version: str, previous: list[str]) -> None:
        data = {"version": version, "previous": previous[:20], "changed": now()}
        text = json.dumps(data, indent=2) + "\n"
        write_atomic(self.root / ACTIVE_FILE, lambda f: f.write(text.encode()))

    def _activate(self, version: str) -> None:
        pointer = self._pointer()
        if pointer["version"] == version:
            return
        previous = [pointer["version"]] + [v for v in pointer["previous"] if v != version]
        previous = [v for v in previous if v == BASE or (self.root / v).is_dir()]  # not pruned
        self._set_pointer(version, previous)

    def _clean_temp(self) -> None:
        """Remove what an interrupted write or prune left behind (called under the lock)."""
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def add(
        self, tensors: Adapter, metadata: dict[str, Any] | None = None, phrases: bytes = b""
    ) -> str:
        """Store `tensors` (and the user's `phrases`, a PhraseModel's bytes) as a new version,
        not activated; returns its name."""
        with self._locked():
            return self._add(tensors, metadata or {}, phrases)

    def _add(self, tensors: Adapter, metadata: dict[str, Any], phrases: bytes = b"") -> str:
        try:
            arrays = check_adapter(tensors, self.artifacts, "the new adapter")
        except ArtifactError as exc:
            raise AdapterStoreError(f"{exc}; not stored") from None
        self._clean_temp()
        existing = self._version_dirs()
        number = (int(existing[-1].name[1:]) + 1) if existing else 1
        version = f"v{number:04d}"
        meta = {
            **metadata,
            "version": version,
            "created": now(),
            "model": self.artifacts.name,
            "model_fingerprint": self.fingerprint,
            "tensors_sha256": tensors_sha256(arrays),
            "parameters": int(sum(a.size for a in arrays.values())),
        }
        if phrases:
            meta["phrases_sha256"] = hashlib.sha256(phrases).hexdigest()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=self.root))
        try:
            _write_synced(tmp / ADAPTER_FILE, _npz_bytes(arrays))
            if phrases:
                _write_synced(tmp / PHRASES_FILE, phrases)
            _write_synced(tmp / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
            _fsync_dir(tmp)
            os.chmod(tmp, 0o700)
            os.rename(tmp, self.root / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        return version

    def promote(
        self, tensors: Adapter, metadata: dict[str, Any] | None = None, phrases: bytes = b""
    ) -> str:
        """Store `tensors` (and `phrases`) as a new version and make it active, atomically;
        returns its name.

        The version directory is complete and synced before the pointer moves, and the pointer
        is replaced by rename: a crash leaves either the old or the new adapter active.
        """
        with self._locked():
            meta = {"parent": self._pointer()["version"], **(metadata or {})}
            version = self._add(tensors, meta, phrases)
            self._activate(version)
            return version

    def use(self, version: str) -> str:
        """Make a stored version (or "base") active after checking it loads."""
        with self._locked():
            version = version_name(version)
            self.load(version)  # refuse a damaged one now, not when the daemon loads it
            self._activate(version)
            return version

    def rollback(self) -> str:
        """Go back to an older adapter: the last one active before the current one that is
        older than it, else the newest older version, else the base model (skipping damaged
        or pruned versions). Never forward: from the base model there is nothing to roll back
        to. Returns the version now active."""
        with self._locked():
            pointer = self._pointer()
            current = pointer["version"]
            if current == BASE:
                raise AdapterStoreError(
                    "the base model is already active; there is nothing older to roll back to "
                    "(serve a version with `keyboard adapters use VERSION`)"
                )
            number = int(current[1:])
            recent = [v for v in pointer["previous"] if v != BASE and int(v[1:]) < number]
            older = [d.name for d in reversed(self._version_dirs()) if int(d.name[1:]) < number]
            for version in dict.fromkeys([*recent, *older, BASE]):
                try:
                    self.load(version)
                except AdapterStoreError as exc:
                    log.warning("rollback skips %s: %s", version, exc)
                    continue
                rest = [v for v in pointer["previous"] if v not in (version, current)]
                self._set_pointer(version, rest)
                return version
            raise AdapterStoreError("nothing to roll back to")  # unreachable: base always loads

    def prune(self, keep: int = DEFAULT_KEEP) -> list[str]:
        """Delete all but the newest `keep` versions; the active one is always kept. Returns
        the versions removed."""
        keep = max(1, keep)
        removed = []
        with self._locked():
            active = self._pointer()["version"]
            dirs = self._version_dirs()
            for d in dirs[: max(0, len(dirs) - keep)]:
                if d.name == active:
                    continue
                trash = self.root / f".trash-{d.name}"
                os.rename(d, trash)  # atomic: the version is either whole or gone
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(d.name)
            if removed:
                _fsync_dir(self.root)
        return removed
