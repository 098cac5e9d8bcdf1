"""Adapter bank merges, guarded: weight 1.0 reproduces itself; merges survive save and reload."""

import torch
from peft import PeftModel

from c2w.learners import LearnerConfig
from c2w.learners.lora import lora_config
from c2w.memory.bank import FAST, AdapterBank

X = torch.randint(0, 1000, (2, 9))


def bank_with_random_fast(tiny, r=4, max_rank=8):
    bank = AdapterBank(tiny.model, lora_config(LearnerConfig(lora_r=r, lora_alpha=2 * r)), max_slow_rank=max_rank)
    return bank


def perturb(bank, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.fast_params():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@torch.no_grad()
def out(bank):
    return bank.model(input_ids=X).logits


def test_one_adapter_at_weight_one_reproduces_itself(tiny):
    bank = bank_with_random_fast(tiny)
    perturb(bank, 0)
    before = out(bank)
    bank.consolidate(weight=1.0)
    assert bank.slow == "slow1" and bank.model.active_adapters == ["slow1", FAST]
    torch.testing.assert_close(out(bank), before, atol=1e-5, rtol=1e-5)
    # the fresh fast adapter has no effect and is the only trainable thing
    assert all(p.requires_grad for p in bank.fast_params())
    assert {n for n, p in bank.model.named_parameters() if p.requires_grad} == \
           {n for n, p in bank.model.named_parameters() if f".{FAST}." in n}


def test_cat_merge_is_the_exact_sum_and_differs_from_base(tiny):
    bank = bank_with_random_fast(tiny)
    with torch.no_grad():
        base = tiny.model(input_ids=X).logits
    perturb(bank, 0)
    bank.consolidate()
    perturb(bank, 1)
    both = out(bank)  # slow1 + fast active
    bank.consolidate()
    torch.testing.assert_close(out(bank), both, atol=1e-5, rtol=1e-5)
    assert bank.model.base_model.peft_config["slow2"].r == 8
    assert (both - base).abs().max() > 1e-3


def test_rank_cap_compresses_with_svd(tiny):
    bank = bank_with_random_fast(tiny, r=4, max_rank=4)
    for s in range(3):
        perturb(bank, s)
        bank.consolidate()
    assert bank.model.base_model.peft_config[bank.slow].r == 4


def test_merged_adapters_survive_save_and_reload(tiny, tmp_path):
    bank = bank_with_random_fast(tiny)
    perturb(bank, 0)
    bank.consolidate()
    perturb(bank, 1)
    expected = out(bank)
    bank.model.save_pretrained(tmp_path, selected_adapters=[bank.slow, FAST])
    import copy

    plain = PeftModel.from_pretrained(copy.deepcopy(tiny.model), tmp_path / bank.slow, adapter_name=bank.slow)
    plain.load_adapter(tmp_path / FAST if (tmp_path / FAST).exists() else tmp_path, adapter_name=FAST)
    plain.base_model.set_adapter([bank.slow, FAST])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=X).logits, expected, atol=1e-5, rtol=1e-5)
