"""The state directory: a complete round trip, plain-PEFT loading, and crash safety of every save step."""

import json

import pytest
import torch

import c2w.state as state
from c2w.learners.base import LearnerConfig
from c2w.learners.c2w import C2WConfig, C2WLearner
from c2w.memory.gate import GateConfig
from c2w.memory.rehearsal import teacher_logprobs
from c2w.state import StateError, load_state, save_state
from c2w.streams.records import Observation
from treeutil import tree

TEXTS = ["Mira Talvik was born in the harbour town of Oskeln.", "The river Quell flows through Dastmoor in 1822."]
PROMPT = "Mira Talvik was born in"


def make_learner(tiny):
    """Gate and paraphrase off (the random tiny model would reject/garble everything); the rehearsal
    set is injected (a few random sequences) instead of sampled with HF generate, which is slow."""
    cfg = LearnerConfig(lr=1e-2, token_budget=120, batch_size=4, seed=3)
    cc = C2WConfig(gate=False, paraphrase=False, rehearsal=False, router=False, n_rehearsal=3, rehearsal_batch=2)
    learner = C2WLearner(tiny, cfg, cc, GateConfig())
    learner.c2w = C2WConfig(gate=False, paraphrase=False, rehearsal=True, router=False, n_rehearsal=3, rehearsal_batch=2)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=g) for n in (9, 12, 7)]
    with learner.bank.model.disable_adapter():
        learner.rehearsal = (seqs, teacher_logprobs(learner.bank.model, seqs, top_k=8))
    return learner


def logits(learner, text=PROMPT):
    ids = learner.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        return learner.model(input_ids=ids).logits[0]


@pytest.fixture(scope="module")
def trained(tiny):
    """Two episodes and a sleep in between: a slow adapter (slow1) and a trained fast adapter."""
    learner = make_learner(tiny)
    learner.observe(0, [Observation("a", 0, TEXTS[0])])
    learner.sleep()
    learner.observe(1, [Observation("b", 1, TEXTS[1])])
    learner.gate_log = [{"id": "a", "episode": 0, "learnability": float("nan"), "unit_surprise": float("inf"),
                         "write": False, "reason": "known"}]
    return learner


def test_round_trip_restores_everything(tiny, trained, tmp_path):
    meta = {**state.new_meta(), "episodes": 2, "next_episode": 2}
    v = save_state(trained, tmp_path, meta)
    assert (tmp_path / "CURRENT").read_text().strip() == v
    loaded, meta2 = load_state(tmp_path)
    assert meta2["episodes"] == 2 and meta2["next_episode"] == 2
    assert loaded.bank.slow == "slow1" == trained.bank.slow and loaded.sleeps == 1
    assert torch.allclose(logits(loaded), logits(trained), atol=1e-5)
    assert loaded.buffer.to_json() == trained.buffer.to_json()
    assert loaded.written_ids == trained.written_ids == {"a", "b"}
    assert loaded.cost == trained.cost and loaded.rng.getstate() == trained.rng.getstate()
    assert loaded.c2w == trained.c2w and loaded.cfg == trained.cfg and loaded.gate_cfg == trained.gate_cfg
    (s1, t1), (s2, t2) = loaded.rehearsal, trained.rehearsal
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(t1, t2))
    # non-finite gate scores are stored as null: the files are strict JSON
    lj = json.loads((tmp_path / v / "learner.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert lj["gate_log"][0]["learnability"] is None
    # only fast is trainable, both adapters are active, and training goes on where it stopped
    assert {n.split(".")[-2] for n, p in loaded.model.named_parameters() if p.requires_grad} == {"fast"}
    loaded.observe(2, [Observation("c", 2, "Oskeln lies on the Ferrow coast.")])
    assert loaded.cost.trained_tokens > trained.cost.trained_tokens
    assert not torch.allclose(logits(loaded), logits(trained), atol=1e-4)


def test_adapters_load_with_plain_peft(tiny, trained, tmp_path):
    import copy

    from peft import PeftModel

    v = save_state(trained, tmp_path, state.new_meta())
    ad = tmp_path / v / "adapters"
    model = PeftModel.from_pretrained(copy.deepcopy(tiny.model), ad / "slow1", adapter_name="slow1")
    model.load_adapter(ad / "fast", adapter_name="fast")
    model.base_model.set_adapter(["slow1", "fast"])
    ids = tiny.tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits[0], logits(trained), atol=1e-5)


@pytest.mark.parametrize("fail_at", ["torch.save", "os.rename", "os.replace"])
def test_a_save_that_dies_at_any_step_leaves_the_previous_state(tiny, trained, tmp_path, monkeypatch, fail_at):
    v1 = save_state(trained, tmp_path, {**state.new_meta(), "episodes": 1})
    before = tree(tmp_path / v1)

    class Killed(BaseException):
        pass

    def die(*a, **k):
        raise Killed

    mod, fn = fail_at.split(".")
    with monkeypatch.context() as m:
        m.setattr({"torch": torch, "os": state.os}[mod], fn, die)
        with pytest.raises(Killed):
            save_state(trained, tmp_path, {**state.new_meta(), "episodes": 2})
    assert state.current_version(tmp_path) == v1 and tree(tmp_path / v1) == before
    assert state.read_status(tmp_path)[2]["meta"]["episodes"] == 1
    if fail_at == "os.replace":  # the new folder is complete but was never committed: it is ignored
        assert (tmp_path / "v000002").is_dir()
        assert load_state(tmp_path, rehearsal=False)[1]["episodes"] == 1
    # a leftover like a killed process leaves (an unrenamed folder, a temp CURRENT) is cleaned next time
    (tmp_path / ".v000077.tmp123").mkdir()
    (tmp_path / ".CURRENT.tmp123").write_text("v000077\n")
    v2 = save_state(trained, tmp_path, {**state.new_meta(), "episodes": 2})
    v3 = save_state(trained, tmp_path, {**state.new_meta(), "episodes": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["CURRENT", v2, v3])
    assert state.read_status(tmp_path)[2]["meta"]["episodes"] == 3


def test_missing_foreign_and_locked_directories(tmp_path):
    with pytest.raises(StateError, match="no c2w state"):
        load_state(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StateError, match="not empty"):
        state.check_dir_usable(tmp_path)
    state.check_dir_usable(tmp_path / "new")
    with state.state_lock(tmp_path / "s"):
        with pytest.raises(StateError, match="in use"):
            with state.state_lock(tmp_path / "s"):
                pass
    with state.state_lock(tmp_path / "s"):  # released
        pass
    (tmp_path / "s" / "CURRENT").write_text("../etc\n")
    with pytest.raises(StateError, match="damaged"):
        load_state(tmp_path / "s")


def test_a_resumed_write_continues_exactly_as_an_uninterrupted_one(tiny, tmp_path):
    """Saved mid-episode (fast adapter trained, no sleep yet), reloaded, then written on: the same
    weights as the learner that never stopped, because AdamW's moments and step travel too."""
    a = make_learner(tiny)
    a.observe(0, [Observation("a", 0, TEXTS[0])])
    save_state(a, tmp_path, state.new_meta())
    b, _ = load_state(tmp_path)
    assert b.opt.state_dict()["state"] and all(
        torch.equal(x["exp_avg"], y["exp_avg"])
        for x, y in zip(a.opt.state_dict()["state"].values(), b.opt.state_dict()["state"].values()))
    for learner in (a, b):
        learner.observe(0, [Observation("b", 0, TEXTS[1])])
    assert torch.allclose(logits(a), logits(b), atol=1e-6)


def test_an_optimizer_file_that_does_not_fit_is_refused(tiny, trained, tmp_path):
    v = save_state(trained, tmp_path, state.new_meta())
    sd = torch.load(tmp_path / v / "optimizer.pt", weights_only=True)
    k = next(iter(sd["state"]))
    sd["state"][k]["exp_avg"] = torch.zeros(3)
    torch.save(sd, tmp_path / v / "optimizer.pt")
    with pytest.raises(StateError, match="optimizer state does not fit"):
        load_state(tmp_path)
    (tmp_path / v / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(StateError, match="optimizer.pt cannot be read"):
        load_state(tmp_path)
    assert load_state(tmp_path, rehearsal=False)[0].bank.slow == "slow1"  # `c2w ask` never reads it


def test_a_routed_learner_keeps_its_router_across_save_and_load(tiny, tmp_path):
    from c2w.memory.router import Router, base_hidden

    learner = make_learner(tiny)
    learner.c2w = C2WConfig(gate=False, paraphrase=False, rehearsal=True, n_rehearsal=3, rehearsal_batch=2, router=True)
    base_texts = ["The weather today is mild.", "Music is a way to tell a story.", "In the morning, I walk.",
                  "The history of the town is long."]
    learner.router = Router.calibrate(learner.model, tiny.tokenizer, base_texts, layer=4)
    learner.observe(0, [Observation("a", 0, TEXTS[0])])
    save_state(learner, tmp_path, state.new_meta())
    loaded, _ = load_state(tmp_path)
    qs = [PROMPT, "Music is"]
    h = base_hidden(loaded.model, tiny.tokenizer, qs, 4)
    assert loaded.router.threshold == learner.router.threshold
    assert loaded.router.score(h) == learner.router.score(h) and loaded.route(qs) == learner.route(qs) == [True, False]
    # a state whose config has the router on but whose router file is gone is refused, not re-sampled
    (tmp_path / (tmp_path / "CURRENT").read_text().strip() / "router.pt").unlink()
    with pytest.raises(StateError, match="router.pt"):
        load_state(tmp_path)


def test_a_state_from_before_the_router_loads_unrouted(tiny, trained, tmp_path):
    v = save_state(trained, tmp_path, state.new_meta())
    cfg_path = tmp_path / v / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in ("router", "router_layer", "router_calibration"):
        cfg["c2w"].pop(k)
    cfg_path.write_text(json.dumps(cfg))
    loaded, _ = load_state(tmp_path)
    assert loaded.router is None and loaded.c2w.router is False and loaded.route([PROMPT]) is None


def test_a_state_from_before_the_budget_floor_keeps_its_budget_rule(tiny, trained, tmp_path):
    assert trained.c2w.min_budget_share == C2WConfig().min_budget_share > 0
    v = save_state(trained, tmp_path, state.new_meta())
    assert load_state(tmp_path)[0].c2w.min_budget_share == C2WConfig().min_budget_share  # saved, read back
    cfg_path = tmp_path / v / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["c2w"].pop("min_budget_share")
    cfg_path.write_text(json.dumps(cfg))
    assert load_state(tmp_path)[0].c2w.min_budget_share == 0.0
