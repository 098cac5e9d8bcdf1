"""Route each input to the adapters or to the frozen base, from what was written (the WISE and
MEMOIR idea: memory is switched on only for inputs it concerns; see research/anchors.md).

Keys are the frozen base's layer-`layer` hidden states of every written text's tokens (unit
vectors). A token of an input is "about something written" by its margin

    margin(h) = max_k cos(h, key_k) - max_c cos(h, contrast_c)

where the contrast set is text the base writes itself: a token that base text explains as well as
the written text does (function words, common relations) earns nothing; a name only the written
text has earns a lot. An input goes through the adapters when its largest token margin exceeds the
largest margin of any held-out base-written text (the threshold), so nothing about the evaluation
tunes it. No text is stored or retrieved: the router only decides adapters on or off.
The first position is dropped everywhere: its hidden state is the attention sink, the same for
every input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _Stop(Exception):
    pass


def _layers(model) -> torch.nn.ModuleList | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    return getattr(inner, "layers", None)


@torch.no_grad()
def base_hidden(model, tokenizer, texts: list[str], layer: int, max_len: int = 128,
                batch_size: int = 32) -> list[torch.Tensor]:
    """Per text, the frozen base's unit hidden states after block `layer` ([n_tokens - 1, d], fp16,
    on the CPU); the forward stops at that block. Adapters are disabled when `model` has them."""
    dev = next(model.parameters()).device
    layers = _layers(model)
    n_layers = len(layers) if layers is not None else getattr(model.config, "num_hidden_layers", layer)
    layer = max(1, min(layer, n_layers))  # a shallower model (the tiny test one) keys on its last block
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else torch.no_grad()
    out: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with off:
        for i in range(0, len(texts), batch_size):
            enc = [tokenizer(t, add_special_tokens=False).input_ids[:max_len] for t in texts[i: i + batch_size]]
            width = max(1, max(len(e) for e in enc))
            ids = torch.tensor([e + [0] * (width - len(e)) for e in enc], device=dev)  # right-padded
            att = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=dev)
            if layers is not None:
                caught: list[torch.Tensor] = []

                def grab(_m, _inp, outp):
                    caught.append(outp[0] if isinstance(outp, tuple) else outp)
                    raise _Stop

                h = layers[layer - 1].register_forward_hook(grab)
                try:
                    model(input_ids=ids, attention_mask=att)
                except _Stop:
                    pass
                finally:
                    h.remove()
                hid = caught[0]
            else:  # an architecture we do not know the blocks of: a full forward
                hid = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[layer]
            hid = F.normalize(hid.float(), dim=-1)
            out += [hid[r, 1: len(e)].half().cpu() for r, e in enumerate(enc)]
    model.train(was_training)
    return out


class Router:
    """keys of written tokens + a contrast set and held-out negatives of base-written text."""

    def __init__(self, contrast: torch.Tensor, negatives: list[torch.Tensor], layer: int):
        self.layer = layer
        self.contrast = contrast  # [n_c, d] fp16 unit vectors
        self.negatives = negatives  # per held-out base text, [n_i, d]
        self.keys = torch.zeros(0, contrast.shape[1], dtype=torch.float16)
        self.threshold = float("inf")  # nothing written: everything goes to the base

    @classmethod
    def calibrate(cls, model, tokenizer, base_texts: list[str], layer: int) -> "Router":
        """Two thirds of `base_texts` become the contrast set, the rest the held-out negatives."""
        if len(base_texts) < 3:
            raise ValueError(f"the router needs at least 3 base-written texts to calibrate, got {len(base_texts)}")
        hid = base_hidden(model, tokenizer, base_texts, layer)
        n = 2 * len(hid) // 3
        return cls(torch.cat(hid[:n]), hid[n:], layer)

    def _margins(self, h: torch.Tensor) -> torch.Tensor:
        """[n] token margins of one text's unit hidden states h [n, d]."""
        if len(h) == 0 or len(self.keys) == 0:
            return torch.full((len(h),), -2.0)
        h = h.float()
        return (h @ self.keys.float().T).amax(1) - (h @ self.contrast.float().T).amax(1)

    def score(self, hidden: list[torch.Tensor]) -> list[float]:
        return [float(self._margins(h).max()) if len(h) else -2.0 for h in hidden]

    def add(self, hidden: list[torch.Tensor]) -> None:
        """Store the written texts' token keys; the threshold is re-measured on the negatives."""
        self.keys = torch.cat([self.keys] + [h.half() for h in hidden])
        self.threshold = max(self.score(self.negatives), default=float("inf")) if len(self.keys) else float("inf")

    def route(self, hidden: list[torch.Tensor]) -> list[bool]:
        return [s > self.threshold for s in self.score(hidden)]

    def state_dict(self) -> dict:
        return {"layer": self.layer, "contrast": self.contrast, "negatives": self.negatives, "keys": self.keys}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "Router":
        r = cls(sd["contrast"], list(sd["negatives"]), int(sd["layer"]))
        r.add([sd["keys"]])
        return r

    def nbytes(self) -> int:
        return 2 * (self.keys.numel() + self.contrast.numel() + sum(n.numel() for n in self.negatives))
