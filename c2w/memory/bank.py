"""Frozen backbone + a bank of PEFT LoRA adapters: `fast` takes online writes, `slow` holds what
sleep consolidated. Both are active at evaluation (their deltas add); only `fast` is trained."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

FAST, SLOW = "fast", "slow"


class AdapterBank:
    def __init__(self, base_model: torch.nn.Module, lora: LoraConfig, max_slow_rank: int = 128):
        self.lora, self.max_slow_rank = lora, max_slow_rank
        # A private copy of the frozen backbone: PEFT injects its layers in place.
        self.model = get_peft_model(copy.deepcopy(base_model), copy.deepcopy(lora), adapter_name=FAST)
        self.generation = 0  # consolidations so far
        self._activate()

    def _activate(self) -> None:
        names = [self.slow, FAST] if self.slow else [FAST]
        self.model.base_model.set_adapter(names)
        for n, p in self.model.named_parameters():
            p.requires_grad_(f".{FAST}." in n)

    def fast_params(self) -> list[torch.Tensor]:
        return [p for n, p in self.model.named_parameters() if f".{FAST}." in n]

    def lora_pairs(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A [r, in], B [out, r]) of every LoRA layer of adapter `name`."""
        out = []
        for m in self.model.modules():
            if hasattr(m, "lora_A") and name in m.lora_A:
                out.append((m.lora_A[name].weight, m.lora_B[name].weight))
        return out

    @property
    def slow(self) -> str | None:
        """Name of the slow adapter: `slow<k>` after k consolidations (PEFT cannot rename adapters)."""
        return f"{SLOW}{self.generation}" if self.generation else None

    def consolidate(self, weight: float = 1.0, combination: str = "cat") -> None:
        """slow <- slow + weight * fast (exact with `cat`; compressed by SVD to max_slow_rank once the
        concatenated rank would exceed it), then a fresh zero-effect fast adapter."""
        lm, old = self.model.base_model, self.slow
        new = f"{SLOW}{self.generation + 1}"
        if old is None:
            lm.add_weighted_adapter([FAST], [weight], new, combination_type="cat")
        else:
            rank = lm.peft_config[old].r + lm.peft_config[FAST].r
            kind = "svd" if combination == "cat" and rank > self.max_slow_rank else combination
            kw = {"svd_rank": self.max_slow_rank} if "svd" in kind else {}
            lm.add_weighted_adapter([old, FAST], [1.0, weight], new, combination_type=kind, **kw)
        self.model.set_adapter(new)
        for name in filter(None, (old, FAST)):
            self.model.delete_adapter(name)
        self.model.add_adapter(FAST, copy.deepcopy(self.lora))
        self.generation += 1
        self._activate()

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.fast_params())

    def state_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if "lora_" in n)
