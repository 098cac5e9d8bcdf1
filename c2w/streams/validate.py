"""Read, check and write stream files (JSONL, one record per line).

A line looks like::

    {"id": "f0001", "episode": 0, "text": "Mira Talvik was born in Oskeln.",
     "probes": [{"prompt": "Mira Talvik was born in the town of", "answer": "Oskeln", "form": "cloze"}]}

Optional fields: ``role`` (learn | control | noise | known | duplicate, default learn),
``replaces`` (the id of a record on an earlier line, in the same or an earlier episode),
``probes`` (default []) and a free ``meta`` object. Any other field is an error, so a typo
cannot silently drop data. Validation collects every problem in the file before failing.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from c2w.streams.records import ROLES, Probe, Record, Stream

FIELDS = ("id", "episode", "text", "probes", "role", "replaces", "meta")
PROBE_FIELDS = ("prompt", "answer", "form")
REQUIRED = ("id", "episode", "text")


@dataclass(frozen=True, slots=True)
class StreamIssue:
    line: int  # 1-based; 0 for problems of the whole file (e.g. an episode gap)
    field: str  # "" when the problem is not about one field (e.g. bad JSON)
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "stream"
        return f"{where}: field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"


class StreamError(ValueError):
    """A stream file failed validation; `.issues` lists every problem found."""

    def __init__(self, issues: list[StreamIssue], path: str | Path | None = None):
        self.issues = list(issues)
        self.path = None if path is None else str(path)
        head = f"{self.path}: " if self.path else ""
        n = len(self.issues)
        lines = "\n".join(f"  {i}" for i in self.issues)
        super().__init__(f"{head}invalid stream, {n} problem{'s' if n != 1 else ''}:\n{lines}")


def _surrogate(value: Any) -> str | None:
    """Where a string holds a lone UTF-16 surrogate ("\\ud83d" escaped alone in JSON, common in
    scraped text): valid JSON, but not Unicode text, and no tokenizer or hash takes it."""
    if isinstance(value, str):
        for k, c in enumerate(value):
            if "\ud800" <= c <= "\udfff":
                return f"holds a lone surrogate {c!r} at character {k}: not valid Unicode text (fix the escape)"
    return None


def _got(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_probes(value: Any, line: int, issues: list[StreamIssue]) -> tuple[Probe, ...] | None:
    if not isinstance(value, list):
        issues.append(StreamIssue(line, "probes", f"must be a list of objects, got {_got(value)}"))
        return None
    probes: list[Probe] = []
    ok = True
    for k, p in enumerate(value):
        name = f"probes[{k}]"
        if not isinstance(p, dict):
            issues.append(StreamIssue(line, name, f"must be an object with 'prompt' and 'answer', got {_got(p)}"))
            ok = False
            continue
        for key in p:
            if key not in PROBE_FIELDS:
                issues.append(StreamIssue(line, f"{name}.{key}",
                                          f"unknown field (allowed: {', '.join(PROBE_FIELDS)})"))
                ok = False
        for key in ("prompt", "answer"):
            if key not in p:
                issues.append(StreamIssue(line, f"{name}.{key}", "is required"))
                ok = False
            elif not isinstance(p[key], str) or not p[key].strip():
                issues.append(StreamIssue(line, f"{name}.{key}", f"must be a non-empty string, got {_got(p[key])}"))
                ok = False
        for key in PROBE_FIELDS:
            if (bad := _surrogate(p.get(key))) is not None:
                issues.append(StreamIssue(line, f"{name}.{key}", bad))
                ok = False
        form = p.get("form", "")
        if not isinstance(form, str):
            issues.append(StreamIssue(line, f"{name}.form", f"must be a string, got {_got(form)}"))
            ok = False
        if ok:
            probes.append(Probe(p["prompt"], p["answer"], form))
    return tuple(probes) if ok else None


def _check_line(obj: Any, line: int, issues: list[StreamIssue]) -> Record | None:
    """Check one parsed line; append its problems to `issues`; return the Record if it is sound."""
    if not isinstance(obj, dict):
        issues.append(StreamIssue(line, "", f"a record must be a JSON object, got {type(obj).__name__}"))
        return None
    n_before = len(issues)
    for key in obj:
        if key not in FIELDS:
            issues.append(StreamIssue(line, key, f"unknown field (allowed: {', '.join(FIELDS)})"))
    for key in REQUIRED:
        if key not in obj:
            issues.append(StreamIssue(line, key, "is required"))

    rid = obj.get("id")
    if "id" in obj and (not isinstance(rid, str) or not rid.strip()):
        issues.append(StreamIssue(line, "id", f"must be a non-empty string, got {_got(rid)}"))
    ep = obj.get("episode")
    if "episode" in obj and (not isinstance(ep, int) or isinstance(ep, bool) or ep < 0):
        issues.append(StreamIssue(line, "episode", f"must be an integer >= 0, got {_got(ep)}"))

    role = obj.get("role", "learn")
    role_ok = isinstance(role, str) and role in ROLES
    if not role_ok:
        issues.append(StreamIssue(line, "role", f"must be one of {', '.join(ROLES)}, got {_got(role)}"))

    text = obj.get("text")
    if "text" in obj:
        if not isinstance(text, str):
            issues.append(StreamIssue(line, "text", f"must be a string, got {_got(text)}"))
        elif role_ok and role != "control" and not text.strip():
            issues.append(StreamIssue(line, "text", f"must be non-empty for a {role} record"))

    probes: tuple[Probe, ...] | None = ()
    if "probes" in obj:
        probes = _check_probes(obj["probes"], line, issues)
    if role == "control" and probes is not None and not probes:
        issues.append(StreamIssue(line, "probes", "a control record needs at least one probe"))

    replaces = obj.get("replaces")
    if "replaces" in obj and (not isinstance(replaces, str) or not replaces.strip()):
        issues.append(StreamIssue(line, "replaces", f"must be the id (a string) of an earlier record, got {_got(replaces)}"))

    for key in ("id", "text", "role", "replaces"):
        if (bad := _surrogate(obj.get(key))) is not None:
            issues.append(StreamIssue(line, key, bad))

    if "meta" in obj and not isinstance(obj["meta"], dict):
        issues.append(StreamIssue(line, "meta", f"must be an object, got {_got(obj['meta'])}"))

    if len(issues) > n_before:
        return None
    return Record(id=rid, episode=ep, text=text, probes=probes or (), role=role, replaces=replaces, line=line)


def validate_lines(lines: Iterable[str]) -> tuple[list[Record], list[StreamIssue]]:
    """Parse and check JSONL lines (blank lines are skipped). Returns the sound records and
    every problem found, in line order (whole-file problems last)."""
    issues: list[StreamIssue] = []
    records: list[Record] = []
    first_line: dict[str, int] = {}  # id -> line of its first occurrence
    episode_of: dict[str, int] = {}  # id -> episode, for ids whose line had a valid episode
    role_of: dict[str, Any] = {}  # id -> role as written
    episodes: set[int] = set()
    pending: list[tuple[int, str, int | None, Any]] = []  # (line, replaces, episode, role) checked at the end
    n_lines = 0

    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        n_lines += 1
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            issues.append(StreamIssue(n, "", f"invalid JSON: {e.msg} (column {e.colno})"))
            continue
        rec = _check_line(obj, n, issues)
        if not isinstance(obj, dict):
            continue
        rid, ep = obj.get("id"), obj.get("episode")
        ep_ok = isinstance(ep, int) and not isinstance(ep, bool) and ep >= 0
        if ep_ok:
            episodes.add(ep)
        if isinstance(rid, str) and rid.strip():
            if rid in first_line:
                issues.append(StreamIssue(n, "id", f"duplicate id {rid!r} (first used on line {first_line[rid]})"))
                rec = None
            else:
                first_line[rid] = n
                role_of[rid] = obj.get("role", "learn")
                if ep_ok:
                    episode_of[rid] = ep
        if isinstance(obj.get("replaces"), str) and obj["replaces"].strip():
            pending.append((n, obj["replaces"], ep if ep_ok else None, obj.get("role", "learn")))
        if rec is not None:
            records.append(rec)

    for n, target, ep, role in pending:
        if role == "control" or role_of.get(target) == "control":
            which = "a control record cannot replace another" if role == "control" else f"{target!r} is a control record"
            issues.append(StreamIssue(n, "replaces", f"{which}: controls are facts that must stay true (a fact that "
                                                     "changes is a learn record)"))
        elif target not in first_line:
            issues.append(StreamIssue(n, "replaces", f"refers to id {target!r}, which is not in the stream"))
        elif first_line[target] >= n:
            issues.append(StreamIssue(n, "replaces", f"must refer to an earlier line, but {target!r} "
                                                     f"is on line {first_line[target]}"))
        elif ep is not None and target in episode_of and episode_of[target] > ep:
            issues.append(StreamIssue(n, "replaces", f"{target!r} is in episode {episode_of[target]}, "
                                                     f"later than this record's episode {ep}"))
    bad_lines = {i.line for i in issues if i.field == "replaces"}
    records = [r for r in records if r.line not in bad_lines]

    if n_lines == 0:
        issues.append(StreamIssue(0, "", "the stream has no records"))
    elif episodes:
        missing = _gaps(episodes)
        if missing:
            issues.append(StreamIssue(0, "episode", "episodes must be contiguous from 0; missing " + missing))
    issues.sort(key=lambda i: (i.line == 0, i.line))
    return records, issues


def _gaps(episodes: set[int], show: int = 10) -> str:
    """The episode numbers missing below max(episodes), as runs ("2", "0, 1", "4-9"), at most `show`
    runs: a stray episode 10**8 costs no list of 10**8 numbers."""
    runs, prev = [], -1
    for e in sorted(episodes):
        if e > prev + 1:
            a, b = prev + 1, e - 1
            runs.append(str(a) if a == b else f"{a}, {b}" if b == a + 1 else f"{a}-{b}")
        prev = e
    more = f" and {len(runs) - show} more runs" if len(runs) > show else ""
    return ", ".join(runs[:show]) + more


def read_lines(path: str | Path) -> list[str]:
    """A stream file's lines. A leading byte-order mark (Windows tools write one) is dropped; "\r\n"
    and "\r" end lines as "\n" does. Lines end at those only: str.splitlines would also cut at
    U+2028, U+2029 or U+0085, which json.dumps(ensure_ascii=False) leaves raw inside strings."""
    return Path(path).read_text(encoding="utf-8-sig").split("\n")


def load_stream(path: str | Path) -> Stream:
    """Load and validate a stream file; raise StreamError listing every problem."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"stream file not found: {p}" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        lines = read_lines(p)
    except UnicodeDecodeError as e:
        raise StreamError([StreamIssue(0, "", f"not UTF-8 text: {e}")], p) from None
    records, issues = validate_lines(lines)
    if issues:
        raise StreamError(issues, p)
    return Stream(records=records, name=p.stem)


def stream_lines(stream: Stream) -> list[str]:
    """The JSONL lines (without newlines) of a stream."""
    return [json.dumps(r.to_json(), ensure_ascii=False) for r in stream.records]


def write_stream(stream: Stream, path: str | Path) -> Path:
    """Validate `stream` and write it as JSONL atomically (temp file + os.replace).
    Raises StreamError (and writes nothing) if the stream would not load back."""
    p = Path(path)
    lines = stream_lines(stream)
    _, issues = validate_lines(lines)
    if issues:
        raise StreamError(issues, p)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p
