"""`lora`: one PEFT LoRA adapter on the frozen backbone, trained sequentially on each episode."""

from __future__ import annotations

import copy
import random

import torch
from peft import LoraConfig, get_peft_model

from c2w.fast import make_optimizer
from c2w.learners.base import Learner
from c2w.learners.train import epoch_sampler, windows, write_texts


def lora_config(cfg) -> LoraConfig:
    """cfg.lora_targets: "all-linear", a comma list of module names ("gate_proj,up_proj,down_proj"),
    or anything PEFT's target_modules takes."""
    t = cfg.lora_targets
    if isinstance(t, str) and "," in t:
        t = [x.strip() for x in t.split(",") if x.strip()]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=t,
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


class LoraLearner(Learner):
    name = "lora"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        # A private copy: PEFT injects layers in place, and other methods share the backbone.
        self.peft = get_peft_model(copy.deepcopy(backbone.model), lora_config(cfg))
        self.params = [p for p in self.peft.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, lr=cfg.lr)
        self.cost.trainable_params = sum(p.numel() for p in self.params)
        # Forward 2N + backward through frozen weights 2N per token, + 6 per trainable parameter.
        self.flops_per_token = 4 * backbone.n_params + 6 * self.cost.trainable_params

    def batches(self, texts: list[str]):
        return epoch_sampler(texts, self.cfg.batch_size, self.rng)

    def observe_steps(self, episode, observations):
        texts = windows(self.tokenizer, [o.text for o in observations if o.text.strip()], self.cfg.max_len)
        if not texts:
            return
        yield from write_texts(self.peft, self.tokenizer, self.opt, self.params, self.batches(texts),
                               self.cfg.token_budget, self.cfg.max_len, self.cost, self.flops_per_token,
                               self.cfg.progress_points, bf16=self.cfg.bf16_writes)
        self.written_ids.update(o.id for o in observations if o.text.strip())
        self.keep(texts)

    def keep(self, texts: list[str]) -> None:
        """After a write: what this method stores of the texts it wrote (lora: nothing)."""

    @property
    def model(self):
        return self.peft

    def state_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)
