"""A `c2w` learner on disk: the state directory that `c2w learn / sleep / ask / status` share.

Layout::

    DIR/CURRENT                 the name of the live version folder ("v000012\\n"), replaced atomically
    DIR/lock                    flock'ed by the one process allowed to write (learn, sleep)
    DIR/v000012/config.json     backbone reference, LearnerConfig, C2WConfig, GateConfig, c2w version
    DIR/v000012/adapters/fast/  PEFT adapter folders, each loadable by plain PEFT:
    DIR/v000012/adapters/slow3/   PeftModel.from_pretrained(base, DIR/v000012/adapters/slow3)
    DIR/v000012/buffer.json     the episodic buffer (EpisodicBuffer.to_json)
    DIR/v000012/learner.json    cost, sleeps, written ids, the full gate log, the sampling RNG
    DIR/v000012/rehearsal.pt    rehearsal sequences + the base's top-k log-probs (not resampled on load)
    DIR/v000012/router.pt       with `router` on: the router's keys, contrast set and negatives (memory/router.py)
    DIR/v000012/optimizer.pt    the fast adapter's AdamW state (moments, step): a resumed write continues
                                exactly as an uninterrupted one would (absent in older states: fresh AdamW)
    DIR/v000012/status.json     {"meta": what the CLI keeps (episodes, last sleep, ...),
                                 "summary": a derived, human-readable digest}

Every update writes a complete new version folder under a hidden temporary name, fsyncs it,
renames it into place, then replaces CURRENT (os.replace) and fsyncs the directory: a process
killed at any moment leaves CURRENT naming the last complete version. Versions other than the live
one and the one before it (and any half-written leftovers) are deleted after the switch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import c2w
from c2w.config import C2WConfig, GateConfig, LearnerConfig

if TYPE_CHECKING:  # reading a state (`c2w status`) must not import torch; writing and loading do, lazily
    from c2w.learners.c2w import C2WLearner

try:
    import fcntl
except ImportError:  # Windows: no advisory lock (one writer at a time is then up to the user)
    fcntl = None

FORMAT = 1
CURRENT = "CURRENT"
LOCK = "lock"
_VERSION = re.compile(r"^v(\d{6,})$")
_LEFTOVER = re.compile(r"^(\.v\d{6,}\.tmp.*|\.CURRENT\.tmp.*)$")
GATE_TAIL = 20


class StateError(RuntimeError):
    """A user-facing problem with a state directory (missing, damaged, in use, mismatched)."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def new_meta() -> dict:
    """What the CLI keeps about a state besides the learner itself."""
    t = now()
    return {"created": t, "updated": t, "episodes": 0, "next_episode": 0, "texts_observed": 0,
            "texts_written": 0, "writes_since_sleep": 0, "last_learn": None, "last_sleep": None}


# --- reading ------------------------------------------------------------------------------------
def current_version(d: str | Path) -> str | None:
    """Name of the live version folder, or None when DIR holds no (complete) state."""
    try:
        name = (Path(d) / CURRENT).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not _VERSION.match(name):
        raise StateError(f"{Path(d) / CURRENT} is damaged (it should name a version folder, got {name[:40]!r})")
    return name


def state_exists(d: str | Path) -> bool:
    return current_version(d) is not None


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text(encoding="utf-8"))


def _read_live(d: str | Path, fn):
    """fn(version_dir) on the live version; retried if a writer replaced it while we read."""
    d = Path(d)
    for _ in range(3):
        name = current_version(d)
        if name is None:
            raise StateError(f"no c2w state in {d} (create one with `c2w learn --state {d} PATH.jsonl`)")
        try:
            return fn(d / name)
        except FileNotFoundError as e:
            if current_version(d) == name:  # not a concurrent switch: the folder is damaged
                raise StateError(f"state {d} is damaged: {name}/{Path(e.filename).name if e.filename else ''} "
                                 f"is missing") from None
    raise StateError(f"state {d} keeps changing under us; try again")


def read_config(d: str | Path) -> dict:
    """config.json of the live version (no model is loaded)."""
    return _read_live(d, lambda v: _read_json(v / "config.json"))


def read_status(d: str | Path) -> tuple[str, dict, dict]:
    """(version name, config, status) of the live version, without loading any model."""
    return _read_live(d, lambda v: (v.name, _read_json(v / "config.json"), _read_json(v / "status.json")))


def check_dir_usable(d: str | Path) -> None:
    """A new state may go into a missing or empty directory, or one holding only our leftovers."""
    d = Path(d)
    if d.exists() and not d.is_dir():
        raise StateError(f"{d} exists and is not a directory")
    if d.is_dir() and not state_exists(d):
        foreign = [p.name for p in d.iterdir() if not (p.name == LOCK or _VERSION.match(p.name) or _LEFTOVER.match(p.name))]
        if foreign:
            raise StateError(f"{d} is not empty and holds no c2w state (found {', '.join(sorted(foreign)[:3])}); "
                             f"give a new or empty directory")


@contextlib.contextmanager
def state_lock(d: str | Path):
    """Exclusive writer lock on DIR (released by the kernel if the process dies)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    f = open(d / LOCK, "a+")
    try:
        try:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StateError(f"state {d} is in use by another c2w process (learn or sleep); try again when it ends") from None
        yield
    finally:
        f.close()


# --- writing ------------------------------------------------------------------------------------
def _clean_json(x):
    """JSON without NaN/Infinity (gate scores use them for 'not measured'): they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean_json(v) for v in x]
    return x


def _write_json(p: Path, obj) -> None:
    p.write_text(json.dumps(_clean_json(obj), indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def adapter_ranks(learner: C2WLearner) -> dict[str, int]:
    from c2w.memory.bank import FAST

    cfgs = learner.bank.model.peft_config
    return {name: int(cfgs[name].r) for name in filter(None, (learner.bank.slow, FAST))}


def gate_counts(gate_log: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in gate_log:
        out[g.get("reason") or "?"] = out.get(g.get("reason") or "?", 0) + 1
    return out


def _config(learner: C2WLearner) -> dict:
    from c2w.memory.bank import FAST

    bb = learner.backbone
    return {"format": FORMAT, "c2w_version": c2w.__version__,
            "backbone": {"name": bb.name, "n_params": bb.n_params},
            "learner": dataclasses.asdict(learner.cfg), "c2w": dataclasses.asdict(learner.c2w),
            "gate": dataclasses.asdict(learner.gate_cfg),
            "adapters": {"fast": f"adapters/{FAST}", "slow": f"adapters/{learner.bank.slow}" if learner.bank.slow else None}}


def _summary(learner: C2WLearner) -> dict:
    return {"backbone": learner.backbone.name, "adapters": adapter_ranks(learner),
            "entries": len(learner.buffer.entries), "buffer_capacity": learner.buffer.capacity,
            "written_ids": len(learner.written_ids), "sleeps": learner.sleeps,
            "cost": dataclasses.asdict(learner.cost), "gate_counts": gate_counts(learner.gate_log),
            "gate_log_tail": learner.gate_log[-GATE_TAIL:], "state_bytes": learner.state_bytes()}


def _write_version(learner: C2WLearner, vdir: Path, meta: dict) -> None:
    import torch

    from c2w.memory.bank import FAST

    vdir.mkdir()
    _write_json(vdir / "config.json", _config(learner))
    adapters = [a for a in (learner.bank.slow, FAST) if a]
    # PEFT writes each non-"default" adapter to adapters/<name>/ (adapter_config.json + safetensors).
    learner.bank.model.save_pretrained(vdir / "adapters", selected_adapters=adapters)
    _write_json(vdir / "buffer.json", learner.buffer.to_json())
    rng = learner.rng.getstate()
    _write_json(vdir / "learner.json", {
        "generation": learner.bank.generation, "sleeps": learner.sleeps, "cost": dataclasses.asdict(learner.cost),
        "written_ids": sorted(learner.written_ids), "gate_log": learner.gate_log,
        "rng": [rng[0], list(rng[1]), rng[2]]})
    torch.save({"rehearsal": learner.rehearsal, "neighbours": learner.neighbours}, vdir / "rehearsal.pt")
    torch.save(learner.opt.state_dict(), vdir / "optimizer.pt")
    if learner.router is not None:
        torch.save(learner.router.state_dict(), vdir / "router.pt")
    _write_json(vdir / "status.json", {"meta": meta, "summary": _summary(learner)})
    _fsync_tree(vdir)


def _versions(d: Path) -> list[int]:
    out = []
    for p in d.iterdir():
        m = _VERSION.match(p.name) or re.match(r"^\.v(\d{6,})\.tmp", p.name)
        if m:
            out.append(int(m.group(1)))
    return out


def save_state(learner: C2WLearner, d: str | Path, meta: dict) -> str:
    """Write the learner and `meta` as a new version of DIR, atomically; return the version name.
    The caller should hold `state_lock(d)`."""
    if learner.rehearsal is None and learner.c2w.sleep and learner.c2w.rehearsal:
        raise ValueError("this learner has no rehearsal set (loaded with rehearsal=False?); saving it would lose it")
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    prev = current_version(d)
    name = f"v{1 + max(_versions(d), default=0):06d}"
    tmp = d / f".{name}.tmp{os.getpid()}"
    meta = {**meta, "updated": now()}
    try:
        _write_version(learner, tmp, meta)
        os.rename(tmp, d / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(d)
    ctmp = d / f".{CURRENT}.tmp{os.getpid()}"
    with open(ctmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(ctmp, d / CURRENT)  # the commit point
    _fsync_path(d)
    for p in d.iterdir():  # keep the live version and the one before it
        if p.name not in (name, prev) and (_VERSION.match(p.name) or _LEFTOVER.match(p.name)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    return name


def init_state(d: str | Path, model_name: str, learner_cfg: LearnerConfig, c2w_cfg: C2WConfig,
               gate_cfg: GateConfig, device: str | None = None) -> tuple[C2WLearner, dict]:
    """Create a state in DIR (missing or empty): load the backbone, build the learner (this samples
    the rehearsal set once), save version 1. Returns (learner, meta)."""
    from c2w.backbone import load_backbone
    from c2w.learners.c2w import C2WLearner

    if state_exists(d):
        raise StateError(f"{d} already holds a c2w state")
    check_dir_usable(d)
    learner = C2WLearner(load_backbone(model_name, device=device), learner_cfg, c2w_cfg, gate_cfg)
    meta = new_meta()
    save_state(learner, d, meta)
    return learner, meta


# --- loading ------------------------------------------------------------------------------------
# Settings a state written by an older c2w lacks, read as what that c2w did: states from before the
# router were unrouted; those from before the budget floor (session 15) spend in proportion to what
# is written. Any other missing setting takes its dataclass default.
OLD_C2W_DEFAULTS = {"router": False, "min_budget_share": 0.0}


def settings(cfg: dict) -> tuple[LearnerConfig, C2WConfig, GateConfig]:
    """The learner, c2w and gate settings a state's config.json stands for."""
    return (_dataclass(LearnerConfig, cfg["learner"], "config.json 'learner'"),
            _dataclass(C2WConfig, {**OLD_C2W_DEFAULTS, **cfg["c2w"]}, "config.json 'c2w'"),
            _dataclass(GateConfig, cfg["gate"], "config.json 'gate'"))


def _dataclass(cls, d: dict, what: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise StateError(f"{what} has settings this c2w version does not know: {', '.join(unknown)} "
                         f"(state written by a newer c2w?)")
    return cls(**d)


def _load_version(vdir: Path, device: str | None, rehearsal: bool) -> tuple[C2WLearner, dict]:
    import torch
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from c2w.backbone import load_backbone
    from c2w.learners.base import Cost
    from c2w.learners.c2w import C2WLearner
    from c2w.memory.bank import FAST, SLOW
    from c2w.memory.buffer import EpisodicBuffer

    cfg = _read_json(vdir / "config.json")
    if cfg.get("format") != FORMAT:
        raise StateError(f"{vdir} has state format {cfg.get('format')!r}; this c2w reads format {FORMAT}")
    lc, cc, gc = settings(cfg)
    status = _read_json(vdir / "status.json")
    lj = _read_json(vdir / "learner.json")
    buf = _read_json(vdir / "buffer.json")
    stored = torch.load(vdir / "rehearsal.pt", weights_only=True) if rehearsal else {}
    reh = stored.get("rehearsal")

    bb = load_backbone(cfg["backbone"]["name"], device=device)
    if bb.n_params != cfg["backbone"]["n_params"]:
        raise StateError(f"backbone {bb.name!r} now has {bb.n_params} parameters, but the state was written "
                         f"on one with {cfg['backbone']['n_params']}: it is not the same model")
    # Built with rehearsal off so that nothing is sampled from the base; the stored set is restored.
    learner = C2WLearner(bb, lc, dataclasses.replace(cc, rehearsal=False, router=False), gc)
    learner.c2w = cc
    if cc.router:  # the router's keys and calibration are restored, not re-sampled
        from c2w.memory.router import Router

        if not (vdir / "router.pt").exists():
            raise StateError(f"{vdir}: the config has the router on but router.pt is missing")
        learner.router = Router.from_state_dict(torch.load(vdir / "router.pt", weights_only=True))
    learner.rehearsal = reh
    learner.neighbours = [tuple(x) for x in stored.get("neighbours", [])]

    bank, dev = learner.bank, bb.device
    slow = cfg["adapters"]["slow"]
    if slow:
        sname = Path(slow).name
        bank.model.load_adapter(str(vdir / slow), adapter_name=sname, torch_device=str(dev))
        bank.generation = int(sname[len(SLOW):])
    if bank.generation != lj["generation"]:
        raise StateError(f"{vdir}: adapters and learner.json disagree (slow generation {bank.generation} "
                         f"vs {lj['generation']})")
    weights = load_file(str(vdir / cfg["adapters"]["fast"] / "adapter_model.safetensors"), device=str(dev))
    res = set_peft_model_state_dict(bank.model, weights, adapter_name=FAST)
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise StateError(f"{vdir}: the fast adapter does not fit this backbone ({bad[0]})")
    bank._activate()

    learner.buffer = EpisodicBuffer.from_json(buf)
    learner.sleeps = lj["sleeps"]
    learner.cost = Cost(**lj["cost"])
    learner.written_ids = set(lj["written_ids"])
    learner.gate_log = lj["gate_log"]
    r = lj["rng"]
    learner.rng.setstate((r[0], tuple(r[1]), r[2]))
    learner._new_optimizer()
    if rehearsal and (vdir / "optimizer.pt").exists():  # read-only loads (`c2w ask`) never train
        _load_optimizer(learner, vdir / "optimizer.pt")
    return learner, status["meta"]


def _load_optimizer(learner: C2WLearner, path: Path) -> None:
    """Restore the fast adapter's AdamW state (onto the learner's device, wherever it was written);
    its tensors must fit the fast parameters one for one."""
    import torch

    try:
        sd = torch.load(path, weights_only=True, map_location=learner.backbone.device)
    except Exception as e:  # truncated or foreign file: the state is damaged, say so in one line
        raise StateError(f"{path} cannot be read ({type(e).__name__}); the state is damaged") from None
    params = learner.params
    for k, st in sd.get("state", {}).items():
        k = int(k)
        if k >= len(params) or any(st.get(m) is None or st[m].shape != params[k].shape for m in ("exp_avg", "exp_avg_sq")):
            raise StateError(f"{path}: optimizer state does not fit the fast adapter (parameter {k})")
    learner.opt.load_state_dict(sd)


def load_state(d: str | Path, device: str | None = None, rehearsal: bool = True) -> tuple[C2WLearner, dict]:
    """Rebuild the learner from the live version of DIR; returns (learner, meta). A half-written
    version is never read: only the folder CURRENT names. rehearsal=False skips the rehearsal set and
    the optimizer state (enough to answer questions; do not save such a learner)."""
    try:
        return _read_live(d, lambda v: _load_version(v, device, rehearsal))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise StateError(f"state {d} is damaged or from another c2w version: {type(e).__name__}: {e}") from None
