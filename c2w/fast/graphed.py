"""A whole write step (forward, backward, gradient clip, AdamW) captured once as a CUDA graph.

At the small batches online writes use (32 x 128 tokens), a LoRA step on a 135M model is a few
thousand small kernels, and launching them from Python costs more than running them. Replaying a
captured graph launches them all at once. The price: fixed shapes. A step takes batches of at most
`batch` rows and `seq` tokens; shorter ones are right-padded and their pad targets weighted 0.

    opt = make_optimizer(params, lr, capturable=True)
    step = GraphedWriteStep(model, params, opt, batch=32, seq=128)
    loss = step(ids, att)            # one optimiser step; loss is a device tensor (no sync)

Capture runs `warmup` eager steps on a side stream (CUDA's allocator and cuBLAS need them), then
records one step; parameters and optimiser state are put back afterwards, so the first replay is
the first real step. Rules: at capture, no autograd graph over these params built on another
stream may still be alive (keep loss.item(), not the loss: its graph pins the params' gradient
accumulators to that stream, and the capture fails); while a GraphedWriteStep is live, don't set
the params' .grad to None (the graph owns those buffers); a new learning rate needs a new capture.
CUDA only; c2w.fast.lm_loss is the path everywhere else.
"""

from __future__ import annotations

import torch

from c2w.fast.loss import dense_loss, next_token_targets


class GraphedWriteStep:
    def __init__(self, model, params: list[torch.Tensor], opt: torch.optim.Optimizer, batch: int, seq: int,
                 clip: float = 1.0, warmup: int = 3):
        dev = params[0].device
        if dev.type != "cuda":
            raise ValueError(f"GraphedWriteStep needs CUDA tensors, got {dev}")
        if not all(g.get("capturable", False) for g in opt.param_groups):
            raise ValueError("the optimiser must be capturable: make_optimizer(params, lr, capturable=True)")
        self.model, self.params, self.opt, self.clip = model, list(params), opt, clip
        self.B, self.L = batch, seq
        self.ids = torch.zeros((batch, seq), dtype=torch.long, device=dev)
        self.w = torch.zeros((batch, seq - 1), dtype=torch.float32, device=dev)
        vocab = model.get_output_embeddings().weight.shape[0]
        keep = [p.detach().clone() for p in self.params]
        self.ids.random_(0, vocab)
        self.w.fill_(1.0)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.opt.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.opt.zero_grad(set_to_none=True)  # backward inside the capture allocates .grad from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step()
        with torch.no_grad():  # undo the warm-up steps: the first replay is the first real step
            for p, k in zip(self.params, keep):
                p.copy_(k)
            for st in self.opt.state.values():
                for v in st.values():
                    if torch.is_tensor(v):
                        v.zero_()

    def _step(self) -> torch.Tensor:
        loss = dense_loss(self.model, self.ids, self.w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        return loss.detach()

    def __call__(self, ids: torch.Tensor, att: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One step on right-padded ids/att [b, l] (b <= batch, l <= seq); loss_mask [b, l] marks the
        target tokens (default: every real token). Returns the step's loss (a live device tensor,
        overwritten by the next step)."""
        b, n = ids.shape
        if b > self.B or n > self.L:
            raise ValueError(f"batch {b} x {n} does not fit the captured {self.B} x {self.L}")
        self.ids.zero_()
        self.w.zero_()
        self.ids[:b, :n].copy_(ids)
        self.w[:b, :n - 1].copy_(next_token_targets(att, loss_mask).float())
        self.graph.replay()
        return self.loss
