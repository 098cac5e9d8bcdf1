"""`rag`: no weight writes; BM25+ (positive idf even on tiny stores) retrieves observed texts into the probe prompt. A reference for the
external-memory route, reported apart from the weight-writing methods."""

from __future__ import annotations

from rank_bm25 import BM25Plus

from c2w.evaluation.scoring import normalise
from c2w.learners.base import Learner
from c2w.learners.train import windows


class RagLearner(Learner):
    name = "rag"
    group = "reference"
    writes_weights = False

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.docs: list[str] = []
        self.index: BM25Plus | None = None

    def observe_steps(self, episode, observations):
        new = [o for o in observations if o.text.strip()]
        texts = [o.text for o in new]
        n = self.cfg.rag_chunk_tokens
        self.docs.extend(windows(self.tokenizer, texts, n) if n else texts)  # passages retrieved
        self.written_ids.update(o.id for o in new)
        if self.docs:
            self.index = BM25Plus([normalise(d, numbers=False).split() for d in self.docs])
        return iter(())

    @property
    def model(self):
        return self.backbone.model

    def contextualize(self, prompts: list[str]) -> list[str]:
        if self.index is None:
            return prompts
        out = []
        for p in prompts:
            scores = self.index.get_scores(normalise(p, numbers=False).split())
            top = sorted(range(len(self.docs)), key=lambda i: -scores[i])[: self.cfg.rag_k]
            ctx = "\n".join(self.docs[i] for i in top if scores[i] > 0)
            out.append(f"{ctx}\n\n{p}" if ctx else p)
        return out

    def state_bytes(self) -> int:
        return sum(len(d.encode()) for d in self.docs)
