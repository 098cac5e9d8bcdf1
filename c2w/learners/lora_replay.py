"""`lora-replay`: sequential LoRA whose batches mix in texts replayed from a uniform buffer."""

from __future__ import annotations

from c2w.learners.lora import LoraLearner
from c2w.learners.train import epoch_sampler


class LoraReplayLearner(LoraLearner):
    name = "lora-replay"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.buffer: list[str] = []
        self.seen = 0  # texts offered to the reservoir so far

    def batches(self, texts: list[str]):
        """Each batch: (1 - replay_fraction) current texts + replay_fraction buffer texts, drawn
        uniformly. The token budget counts both, so replay is paid for, not free."""
        fresh = epoch_sampler(texts, self.cfg.batch_size, self.rng)
        n_old = round(self.cfg.batch_size * self.cfg.replay_fraction) if self.buffer else 0

        def sample() -> list[str]:
            return fresh()[: self.cfg.batch_size - n_old] + [self.rng.choice(self.buffer) for _ in range(n_old)]

        return sample

    def keep(self, texts: list[str]) -> None:
        # reservoir sampling keeps a uniform sample of everything seen (a long text's windows, each)
        for text in texts:
            self.seen += 1
            if len(self.buffer) < self.cfg.buffer_size:
                self.buffer.append(text)
            elif (j := self.rng.randrange(self.seen)) < self.cfg.buffer_size:
                self.buffer[j] = text

    def state_bytes(self) -> int:
        return super().state_bytes() + sum(len(t.encode()) for t in self.buffer)
