"""`full-ft`: sequential full fine-tuning of every backbone weight (the one method that unfreezes it)."""

from __future__ import annotations

import copy
import random

import torch

from c2w.fast import make_optimizer
from c2w.learners.base import Learner
from c2w.learners.train import epoch_sampler, windows, write_texts


class FullFTLearner(Learner):
    name = "full-ft"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.net = copy.deepcopy(backbone.model).requires_grad_(True)
        self.params = list(self.net.parameters())
        self.opt = make_optimizer(self.params, lr=cfg.lr)
        self.cost.trainable_params = sum(p.numel() for p in self.params)
        self.flops_per_token = 6 * backbone.n_params

    def observe_steps(self, episode, observations):
        texts = windows(self.tokenizer, [o.text for o in observations if o.text.strip()], self.cfg.max_len)
        if not texts:
            return
        yield from write_texts(self.net, self.tokenizer, self.opt, self.params, epoch_sampler(texts, self.cfg.batch_size, self.rng),
                    self.cfg.token_budget, self.cfg.max_len, self.cost, self.flops_per_token,
                    self.cfg.progress_points, bf16=self.cfg.bf16_writes)
        self.written_ids.update(o.id for o in observations if o.text.strip())

    @property
    def model(self):
        return self.net

    def state_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)
