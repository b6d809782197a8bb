# SPDX-License-Identifier: GPL-2.0-or-later
"""The patch queue: patches/series I/O, apply into a git tree, export back.

Layout (gbp-pq style)::

    patches/series                    order, one entry per line, '#' comments
    patches/<topic>/NNNN-slug.patch   git format-patch output

`apply` makes build/qemu/ a git tree: one commit with the pristine
upstream source, tagged `upstream`, then one commit per series entry
with the author, date and message of the patch. Entries in a folder
named after a source kind (`debian-ds/`) apply only to that kind.

Work happens in that tree: rebase, amend, commit. `export` then writes
the commits after `upstream` back to patches/ with `git format-patch`
(FORMAT_PATCH_ARGS). Topic folders: a commit whose subject equals the
subject of a patch in the old series keeps that patch's folder; a new
commit joins the folder of the commit before it (`curling/` for the first
one, or after a source kind's folder). Files are numbered per folder, in series
order, so adding a patch to one folder never renames another folder's
files. Export right after apply writes nothing.

Apply is incremental: the series entries, their content hashes and the
commits made from them are kept in .git/curling-queue.json. With nothing
changed apply does nothing; otherwise the commits are re-made from the
first changed patch on, and the new tree is checked out over the old one
so that only files whose content changed are written (mtimes of the
others stay, and ninja rebuilds only what changed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.header
import email.utils
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pygit2
from pygit2.enums import ApplyLocation, CheckoutStrategy, FileMode, FileStatus

from . import CurlingError
from .source import Source

log = logging.getLogger(__name__)

SERIES = "series"
DEFAULT_TOPIC = "curling"
# Topic folders named after a source kind apply only to that kind.
KIND_TOPICS = frozenset({"debian-ds"})

BRANCH = "refs/heads/main"
UPSTREAM_TAG = "refs/tags/upstream"
STATE_FILE = "curling-queue.json"
STATE_FORMAT = 1

# How patches are written. Fixed settings so that output does not depend
# on the user's git configuration or on the size of the repository.
FORMAT_PATCH_ARGS: tuple[str, ...] = (
    "-c", "core.abbrev=12",
    "format-patch", "--zero-commit", "--no-signature", "--no-numbered",
)
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "LC_ALL": "C"}

BUILD_SIGNATURE = ("Curling build", "curling@localhost")


class PatchQueueError(CurlingError):
    pass


class SeriesError(PatchQueueError):
    pass


class PatchFormatError(PatchQueueError):
    pass


class PatchApplyError(PatchQueueError):
    """A patch does not apply; names the patch, the file and the hunk."""

    def __init__(self, patch: str, path: Optional[str] = None,
                 hunk: Optional[str] = None, detail: str = "") -> None:
        self.patch, self.path, self.hunk, self.detail = patch, path, hunk, detail
        where = f": {path}" if path else ""
        if hunk:
            where += f", {hunk}"
        tail = f" ({detail})" if detail else ""
        super().__init__(f"patch {patch} does not apply{where}{tail}")


class TreeStateError(PatchQueueError):
    """build/qemu holds work that apply would throw away."""


# ---------------------------------------------------------------------------
# series

@dataclasses.dataclass(frozen=True)
class SeriesEntry:
    name: str          # relative to patches/, e.g. "curling/0001-foo.patch"
    lineno: int = 0

    @property
    def topic(self) -> str:
        return self.name.split("/", 1)[0] if "/" in self.name else ""

    def applies_to(self, kind: str) -> bool:
        return self.topic not in KIND_TOPICS or self.topic == kind


def parse_series(text: str) -> list[SeriesEntry]:
    """Entries of a series file: '#' starts a comment, blank lines are
    ignored, the first word of a line is the patch path."""
    entries = []
    seen = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split()[0]
        if name.startswith("/") or ".." in name.split("/"):
            raise SeriesError(f"series line {lineno}: bad patch path {name!r}")
        if name in seen:
            raise SeriesError(f"series line {lineno}: {name} listed twice")
        seen.add(name)
        entries.append(SeriesEntry(name, lineno))
    return entries


def read_series(patches_dir: Path) -> list[SeriesEntry]:
    """The series, or [] when patches/series does not exist."""
    path = patches_dir / SERIES
    if not path.is_file():
        return []
    return parse_series(path.read_text(encoding="utf-8"))


def split_for_kind(entries: Sequence[SeriesEntry], kind: str
                   ) -> tuple[list[SeriesEntry], list[SeriesEntry]]:
    """(entries applied for this source kind, entries skipped)."""
    applied = [e for e in entries if e.applies_to(kind)]
    skipped = [e for e in entries if not e.applies_to(kind)]
    return applied, skipped


def bisect_build_points(entries: Sequence[SeriesEntry], kind: str) -> list[bool]:
    """For each entry applied for ``kind``: is the tree expected to build
    after it? A source kind's fix-ups (e.g. debian-ds/) make that source
    buildable only together, so only the last of them is a build point;
    every other patch must build on its own."""
    applied, _skipped = split_for_kind(entries, kind)
    points = []
    for i, entry in enumerate(applied):
        later_same_kind = any(e.topic == entry.topic for e in applied[i + 1:])
        points.append(not (entry.topic in KIND_TOPICS and later_same_kind))
    return points


def render_series(old_text: str, names: Sequence[str],
                  renamed: dict[str, str]) -> str:
    """A new series text listing `names`, keeping the old file's comments.

    Comment and blank lines stay attached to the entry below them (via
    `renamed`, old name -> new name); lines after the last entry stay last.
    """
    header: list[str] = []
    attached: dict[str, list[str]] = {}
    pending: list[str] = []
    first = True
    for raw in old_text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            pending.append(raw)
            continue
        if first:
            header, pending, first = pending, [], False
        new = renamed.get(line.split()[0])
        if new is not None:
            attached[new] = pending
        pending = []
    if first:
        header, pending = pending, []
    out = list(header)
    for name in names:
        out.extend(attached.get(name, []))
        out.append(name)
    out.extend(pending)
    return "".join(f"{ln}\n" for ln in out)


# ---------------------------------------------------------------------------
# patches

@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    author_name: str
    author_email: str
    time: int
    offset: int        # minutes east of UTC
    subject: str
    message: str
    diff: bytes

    def signature(self) -> pygit2.Signature:
        return pygit2.Signature(self.author_name, self.author_email,
                                self.time, self.offset)


_SUBJECT_PREFIX = re.compile(r"^\[PATCH[^\]]*\]\s*")
_SIGNATURE = re.compile(rb"\n-- \n\d+(\.\d+)+[^\n]*\n*\Z")


def _decode_header(value: str) -> str:
    return str(email.header.make_header(email.header.decode_header(value)))


def parse_patch(data: bytes, name: str) -> Patch:
    """Parse one `git format-patch` mail."""
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        raise PatchFormatError(f"{name}: no mail header")
    headers: dict[str, str] = {}
    last = None
    for raw in head.decode("utf-8", "replace").split("\n"):
        if raw.startswith("From ") and last is None:
            continue  # mbox separator
        if raw[:1] in (" ", "\t") and last:
            headers[last] += raw          # folded header: keep the whitespace
            continue
        key, colon, value = raw.partition(":")
        if not colon:
            raise PatchFormatError(f"{name}: bad header line {raw!r}")
        last = key.strip().lower()
        headers[last] = value.strip()
    for key in ("from", "date", "subject"):
        if key not in headers:
            raise PatchFormatError(f"{name}: no {key.capitalize()}: header")

    author_name, author_email = email.utils.parseaddr(_decode_header(headers["from"]))
    if not author_email:
        raise PatchFormatError(f"{name}: bad From: header {headers['from']!r}")
    date = email.utils.parsedate_tz(headers["date"])
    if date is None:
        raise PatchFormatError(f"{name}: bad Date: header {headers['date']!r}")
    time = email.utils.mktime_tz(date)
    offset = (date[9] or 0) // 60
    subject = _SUBJECT_PREFIX.sub("", _decode_header(headers["subject"]).strip(), 1)

    lines = body.split(b"\n")
    msg_lines: list[bytes] = lines
    for i, line in enumerate(lines):
        if line.rstrip(b"\r") == b"---" or line.startswith((b"diff -", b"Index: ")):
            msg_lines = lines[:i]
            break
    text = b"\n".join(msg_lines).decode("utf-8", "replace").strip("\n")
    message = f"{subject}\n\n{text}\n" if text else f"{subject}\n"

    start = body.find(b"diff --git ")
    while start > 0 and body[start - 1:start] != b"\n":
        start = body.find(b"diff --git ", start + 1)
    diff = body[start:] if start >= 0 else b""
    diff = _SIGNATURE.sub(b"\n", diff)
    return Patch(name=name, author_name=author_name, author_email=author_email,
                 time=time, offset=offset, subject=subject, message=message,
                 diff=diff)


def _split_files(diff: bytes) -> list[bytes]:
    """Split a git diff into one diff per file."""
    parts = re.split(rb"(?m)^(?=diff --git )", diff)
    return [p for p in parts if p.startswith(b"diff --git ")]


def _split_hunks(file_diff: bytes) -> tuple[bytes, list[bytes]]:
    """(file header, hunks) of a one-file diff."""
    parts = re.split(rb"(?m)^(?=@@ )", file_diff)
    return parts[0], parts[1:]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# the tree

@dataclasses.dataclass
class ApplyResult:
    changed: bool
    head: str
    applied: list[str]
    skipped: list[str]


@dataclasses.dataclass
class ExportResult:
    written: list[str]
    removed: list[str]
    series_changed: bool

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed or self.series_changed)


def _tree_insert(root: dict[str, Any], path: str, item: tuple[pygit2.Oid, int]) -> None:
    parts = path.split("/")
    node = root
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PatchQueueError(f"source tree: {path} is below a file")
        node = child
    node[parts[-1]] = item


def _write_tree(repo: pygit2.Repository, node: dict[str, Any]) -> pygit2.Oid:
    builder = repo.TreeBuilder()
    for name, item in node.items():
        if isinstance(item, dict):
            builder.insert(name, _write_tree(repo, item), FileMode.TREE)
        else:
            builder.insert(name, item[0], item[1])
    return builder.write()


def _safe_relpath(name: str, top: Optional[str]) -> Optional[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if top is not None:
        if not parts or parts[0] != top:
            raise PatchQueueError(f"source archive: {name} is outside {top}/")
        parts = parts[1:]
    if any(p == ".." or p == ".git" for p in parts):
        raise PatchQueueError(f"source archive: unsafe member {name}")
    return "/".join(parts) or None


def import_source(repo: pygit2.Repository, source: Source) -> pygit2.Oid:
    """Commit the pristine source tree; returns the commit id.

    Reads the archive members straight into git objects: nothing is
    extracted, so the archive's owners and permissions beyond the
    executable bit never reach the disk.
    """
    root: dict[str, Any] = {}
    files: dict[str, tuple[pygit2.Oid, int]] = {}
    top = source.release.top_dir
    mtime = 0
    count = 0
    with source.open_tar() as tar:
        for member in tar:
            if not mtime:
                mtime = int(member.mtime)
            rel = _safe_relpath(member.name, top)
            if rel is None or member.isdir():
                continue
            if member.isreg():
                fobj = tar.extractfile(member)
                assert fobj is not None
                oid = repo.create_blob(fobj.read())
                mode = (FileMode.BLOB_EXECUTABLE if member.mode & 0o111
                        else FileMode.BLOB)
            elif member.issym():
                oid, mode = repo.create_blob(member.linkname.encode()), FileMode.LINK
            elif member.islnk():
                target = _safe_relpath(member.linkname, top)
                if target not in files:
                    raise PatchQueueError(f"source archive: {member.name} links "
                                          f"to unknown {member.linkname}")
                oid, mode = files[target]
            else:
                log.debug("source archive: skipping special file %s", member.name)
                continue
            files[rel] = (oid, mode)
            _tree_insert(root, rel, (oid, mode))
            count += 1
            if count % 10000 == 0:
                log.info("  imported %d files", count)
    if not files:
        raise PatchQueueError(f"source archive of {source.origin} is empty")
    tree = _write_tree(repo, root)
    sig = pygit2.Signature(*BUILD_SIGNATURE, mtime, 0)
    rel_ = source.release
    message = (f"Import upstream QEMU {rel_.version} ({source.kind})\n\n"
               f"Source: {source.origin}\n"
               f"Identity: {source.identity}\n")
    commit = repo.create_commit(None, sig, sig, message, tree, [])
    log.info("  imported %d files as %s", count, str(commit)[:12])
    return commit


class PatchQueue:
    """patches/ on one side, the git tree build/qemu/ on the other."""

    def __init__(self, patches_dir: Path, tree_dir: Path) -> None:
        self.patches_dir = patches_dir
        self.tree_dir = tree_dir

    # -- state ---------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.tree_dir / ".git" / STATE_FILE

    def load_state(self) -> Optional[dict[str, Any]]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("format") == STATE_FORMAT else None

    def _save_state(self, state: dict[str, Any]) -> None:
        state = dict(state, format=STATE_FORMAT)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, self.state_path)

    def require_state(self) -> dict[str, Any]:
        state = self.load_state()
        if state is None:
            raise PatchQueueError(f"{self.tree_dir} has not been set up "
                                  "(run scripts/build.py apply)")
        return state

    def _open(self) -> Optional[pygit2.Repository]:
        if not (self.tree_dir / ".git").is_dir():
            return None
        return pygit2.Repository(str(self.tree_dir))

    def _wanted(self, kind: str) -> tuple[list[dict[str, str]], list[SeriesEntry]]:
        applied, skipped = split_for_kind(read_series(self.patches_dir), kind)
        wanted = []
        for entry in applied:
            path = self.patches_dir / entry.name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise SeriesError(f"series lists {entry.name}, but "
                                  f"{path} cannot be read: {exc.strerror}") from None
            wanted.append({"name": entry.name, "sha256": sha256_bytes(data)})
        return wanted, skipped

    def modified_files(self, repo: pygit2.Repository) -> list[str]:
        """Tracked files with uncommitted changes (untracked ones ignored)."""
        status = repo.status(untracked_files="no")
        return sorted(p for p, flags in status.items()
                      if flags not in (FileStatus.CURRENT, FileStatus.IGNORED))

    def unsaved_work(self, repo: Optional[pygit2.Repository] = None) -> Optional[str]:
        """Why throwing build/qemu away would lose work, or None."""
        repo = repo or self._open()
        state = self.load_state()
        if repo is None or state is None:
            return None
        head = None if repo.head_is_unborn else str(repo.head.target)
        if head != state.get("head"):
            return (f"HEAD moved to {str(head)[:12]} since the last apply/export "
                    "(commits not exported)")
        modified = self.modified_files(repo)
        if modified:
            return (f"uncommitted changes in {len(modified)} file(s), "
                    f"e.g. {modified[0]}")
        return None

    def _check_untouched(self, repo: pygit2.Repository) -> None:
        reason = self.unsaved_work(repo)
        if reason:
            raise TreeStateError(
                f"{self.tree_dir}: {reason}; export them first "
                "(scripts/build.py export) or discard them (apply --force)")

    # -- apply ---------------------------------------------------------
    def apply(self, source: Source, force: bool = False) -> ApplyResult:
        wanted, skipped = self._wanted(source.kind)
        skipped_names = [e.name for e in skipped]
        repo = self._open()
        state = self.load_state() if repo is not None else None
        fresh = repo is None
        if repo is None:
            self.tree_dir.mkdir(parents=True, exist_ok=True)
            repo = pygit2.init_repository(str(self.tree_dir), initial_head="main")
        elif state is not None and not force:
            head = None if repo.head_is_unborn else str(repo.head.target)
            if (state.get("identity") == source.identity
                    and head == state.get("head")
                    and [{"name": p["name"], "sha256": p["sha256"]}
                         for p in state["patches"]] == wanted):
                log.info("build tree up to date: %s + %d patch(es)",
                         source.kind, len(wanted))
                return ApplyResult(False, head, [w["name"] for w in wanted],
                                   skipped_names)
            self._check_untouched(repo)

        prior: list[dict[str, str]] = []
        upstream = None
        if (state is not None and state.get("identity") == source.identity
                and state.get("upstream") in repo):
            upstream = pygit2.Oid(hex=state["upstream"])
            prior = state["patches"]
        if upstream is None:
            log.info("importing %s", source.origin)
            upstream = import_source(repo, source)

        parent = upstream
        done: list[dict[str, str]] = []
        for old, new in zip(prior, wanted):
            if (old["name"], old["sha256"]) != (new["name"], new["sha256"]) \
                    or old["commit"] not in repo:
                break
            done.append(old)
            parent = pygit2.Oid(hex=old["commit"])
        if done:
            log.info("%d patch(es) unchanged", len(done))
        with self._scratch_index(repo):
            for item in wanted[len(done):]:
                data = (self.patches_dir / item["name"]).read_bytes()
                patch = parse_patch(data, item["name"])
                parent = self._commit_patch(repo, parent, patch)
                log.info("applied %s", item["name"])
                done.append(dict(item, commit=str(parent)))

        self._checkout(repo, parent, force=force or fresh or state is None)
        repo.references.create(UPSTREAM_TAG, upstream, force=True)
        self._save_state({"identity": source.identity, "kind": source.kind,
                          "version": source.release.version,
                          "upstream": str(upstream), "patches": done,
                          "head": str(parent)})
        return ApplyResult(True, str(parent), [w["name"] for w in wanted],
                           skipped_names)

    @contextlib.contextmanager
    def _scratch_index(self, repo: pygit2.Repository) -> Iterator[None]:
        """Patches are applied in the repository index (libgit2 writes it);
        put the real index back afterwards so its stat cache survives."""
        path = self.tree_dir / ".git" / "index"
        saved = path.read_bytes() if path.exists() else None
        try:
            yield
        finally:
            if saved is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(saved)
            repo.index.read(True)

    def _commit_patch(self, repo: pygit2.Repository, parent: pygit2.Oid,
                      patch: Patch) -> pygit2.Oid:
        index = repo.index
        index.read_tree(repo[parent].peel(pygit2.Commit).tree)
        index.write()
        if patch.diff.strip():
            try:
                diff = pygit2.Diff.parse_diff(patch.diff)
            except pygit2.GitError as exc:
                raise PatchFormatError(f"{patch.name}: cannot parse diff: {exc}") from None
            try:
                repo.apply(diff, ApplyLocation.INDEX)
            except pygit2.GitError as exc:
                raise self._locate_failure(repo, patch, exc) from None
            index.read(True)
        tree = index.write_tree()
        sig = patch.signature()
        return repo.create_commit(None, sig, sig, patch.message, tree, [parent])

    def _locate_failure(self, repo: pygit2.Repository, patch: Patch,
                        exc: Exception) -> PatchApplyError:
        """Find the file and hunk of `patch` that does not apply."""
        for file_diff in _split_files(patch.diff):
            try:
                diff = pygit2.Diff.parse_diff(file_diff)
                if repo.applies(diff, ApplyLocation.INDEX):
                    continue
                delta = next(iter(diff)).delta
                path = delta.old_file.path or delta.new_file.path
            except (pygit2.GitError, StopIteration):
                continue
            header, hunks = _split_hunks(file_diff)
            for i in range(1, len(hunks) + 1):
                part = pygit2.Diff.parse_diff(header + b"".join(hunks[:i]))
                if not repo.applies(part, ApplyLocation.INDEX):
                    at = hunks[i - 1].split(b"\n", 1)[0].decode("utf-8", "replace")
                    at = re.sub(r"^(@@ [^@]* @@).*", r"\1", at)
                    return PatchApplyError(patch.name, path, f"hunk #{i} {at}")
            return PatchApplyError(patch.name, path, None, str(exc))
        return PatchApplyError(patch.name, None, None, str(exc))

    def _checkout(self, repo: pygit2.Repository, commit: pygit2.Oid,
                  force: bool) -> None:
        """Make the work tree match `commit`, writing only changed files."""
        tree = repo[commit].peel(pygit2.Commit).tree
        strategy = CheckoutStrategy.FORCE if force else CheckoutStrategy.SAFE
        repo.checkout_tree(tree, strategy=strategy | CheckoutStrategy.RECREATE_MISSING)
        repo.references.create(BRANCH, commit, force=True)
        repo.set_head(BRANCH)

    # -- walking the queue ---------------------------------------------
    def commits(self) -> tuple[pygit2.Repository, pygit2.Oid, list[pygit2.Commit]]:
        """(repo, upstream commit, commits after it, oldest first)."""
        state = self.require_state()
        repo = self._open()
        if repo is None:
            raise PatchQueueError(f"{self.tree_dir} is not a git tree")
        upstream = pygit2.Oid(hex=state["upstream"])
        out: list[pygit2.Commit] = []
        commit = repo.head.peel(pygit2.Commit)
        while commit.id != upstream:
            if len(commit.parents) != 1:
                raise PatchQueueError(
                    f"commit {str(commit.id)[:12]} is not a single-parent commit "
                    f"on top of upstream {str(upstream)[:12]}")
            out.append(commit)
            commit = commit.parents[0]
        out.reverse()
        return repo, upstream, out

    def bisect_steps(self, commits: Sequence[pygit2.Commit]
                     ) -> Iterator[pygit2.Commit]:
        """Check out each commit in turn (detached HEAD, only changed files
        written); the branch is checked out again at the end. Use with
        contextlib.closing()."""
        repo = self._open()
        assert repo is not None
        final = repo.head.target
        try:
            for commit in commits:
                # objects of another Repository instance are refused
                own = repo[commit.id].peel(pygit2.Commit)
                repo.checkout_tree(own.tree, strategy=CheckoutStrategy.SAFE)
                repo.set_head(own.id)
                yield own
        finally:
            repo.checkout_tree(repo[final].peel(pygit2.Commit).tree,
                               strategy=CheckoutStrategy.SAFE)
            repo.set_head(BRANCH)

    # -- export --------------------------------------------------------
    def format_patches(self, upstream: pygit2.Oid, outdir: Path) -> list[Path]:
        cmd = ["git", *FORMAT_PATCH_ARGS, "-o", str(outdir), f"{upstream}..HEAD"]
        proc = subprocess.run(cmd, cwd=self.tree_dir, env=dict(os.environ, **GIT_ENV),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, check=False)
        if proc.returncode != 0:
            raise PatchQueueError(f"git format-patch failed: {proc.stderr.strip()}")
        return sorted(outdir.glob("*.patch"))

    def export(self) -> ExportResult:
        state = self.require_state()
        repo, upstream, commits = self.commits()
        kind = state["kind"]
        series_path = self.patches_dir / SERIES
        old_text = series_path.read_text(encoding="utf-8") if series_path.is_file() else ""
        old_entries = parse_series(old_text)
        applied, skipped = split_for_kind(old_entries, kind)

        # subject -> old entries, to keep each patch in its topic folder
        by_subject: dict[str, list[SeriesEntry]] = {}
        for entry in applied:
            try:
                subj = parse_patch((self.patches_dir / entry.name).read_bytes(),
                                   entry.name).subject
            except (OSError, PatchFormatError):
                continue
            by_subject.setdefault(subj, []).append(entry)

        with tempfile.TemporaryDirectory(prefix="curling-export-") as tmp:
            generated = self.format_patches(upstream, Path(tmp))
            if len(generated) != len(commits):
                raise PatchQueueError(f"git format-patch wrote {len(generated)} "
                                      f"patches for {len(commits)} commits")
            exported: list[tuple[Optional[SeriesEntry], str, bytes]] = []
            for path in generated:
                data = path.read_bytes()
                subj = parse_patch(data, path.name).subject
                matches = by_subject.get(subj) or []
                old = matches.pop(0) if matches else None
                slug = re.sub(r"^\d+-", "", path.name)
                exported.append((old, slug, data))

        # final order: exported commits, with skipped entries kept in place
        # (right after the applied entry that preceded them in the old series)
        after: dict[Optional[str], list[SeriesEntry]] = {}
        prev: Optional[str] = None
        for entry in old_entries:
            if entry.applies_to(kind):
                prev = entry.name
            else:
                after.setdefault(prev, []).append(entry)
        placed_old = {old.name for old, _s, _d in exported if old}
        order: list[tuple[str, Any]] = [("keep", e) for e in after.pop(None, [])]
        for old, slug, data in exported:
            order.append(("new", (old, slug, data)))
            if old is not None:
                order.extend(("keep", e) for e in after.pop(old.name, []))
        for name in list(after):           # predecessor was dropped
            if name not in placed_old:
                order.extend(("keep", e) for e in after.pop(name))

        counters: dict[str, int] = {}
        names: list[str] = []
        renamed: dict[str, str] = {}
        contents: dict[str, bytes] = {}
        # a new commit joins the topic of the commit before it (a fix put
        # after the fixes stays with them), unless that topic is a source
        # kind's own
        topic = DEFAULT_TOPIC
        for what, item in order:
            if what == "keep":
                names.append(item.name)
                renamed[item.name] = item.name
                continue
            old, slug, data = item
            if old is not None:
                topic = old.topic
            elif topic in KIND_TOPICS:
                topic = DEFAULT_TOPIC
            counters[topic] = counters.get(topic, 0) + 1
            prefix = f"{topic}/" if topic else ""
            name = f"{prefix}{counters[topic]:04d}-{slug}"
            names.append(name)
            contents[name] = data
            if old is not None:
                renamed[old.name] = name

        written, removed = [], []
        for name, data in contents.items():
            path = self.patches_dir / name
            try:
                if path.read_bytes() == data:
                    continue
            except OSError:
                pass
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(name)
        for entry in applied:
            if entry.name not in contents:
                (self.patches_dir / entry.name).unlink(missing_ok=True)
                removed.append(entry.name)

        series_changed = names != [e.name for e in old_entries]
        if series_changed:
            self.patches_dir.mkdir(parents=True, exist_ok=True)
            series_path.write_text(render_series(old_text, names, renamed),
                                   encoding="utf-8")

        # the tree now matches patches/: the next apply has nothing to do
        patches = [{"name": n, "sha256": sha256_bytes(contents[n]),
                    "commit": str(c.id)}
                   for n, c in zip([n for n in names if n in contents], commits)]
        self._save_state(dict(state, patches=patches, head=str(repo.head.target)))
        return ExportResult(written, removed, series_changed)
