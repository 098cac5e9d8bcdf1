"""Route each input to the adapters or to the frozen base, from what was written (the WISE and
MEMOIR idea: memory is switched on only for inputs it concerns; see research/anchors.md).

Keys are the frozen base's layer-`layer` hidden states of every written text's tokens (unit
vectors). A token of an input is "about something written" by its margin

    margin(h) = max_k cos(h, key_k) - max_c cos(h, contrast_c)

where the contrast set is text the base writes itself: a token that base text explains as well as
the written text does (function words, common relations) earns nothing; a name only the written
text has earns a lot. An input goes through the adapters when its largest token margin exceeds the
largest margin of any held-out base-written text (the threshold; three folds, see Router), so
nothing about the evaluation tunes it. No text is stored or retrieved: the router only decides adapters on or off.
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
    """Keys of written tokens, scored against folds of base-written text.

    Each fold is (contrast set, held-out negatives): the calibration texts are split in `FOLDS`
    parts by index (i % FOLDS); each part is held out once, against the rest as contrast. A fold's
    threshold is the largest margin of its negatives. An input's score is the mean over folds of
    (its largest token margin - the fold's threshold), and it goes through the adapters when the
    score is > 0. One held-out third alone made a threshold that swung with the sample (0.10-0.33
    on the dev set of scripts/router_dev.py); the mean of three folds routed less general text on
    at about the same recall there (BENCHMARKS.md, session 13).
    """

    FOLDS = 3

    def __init__(self, folds: list[tuple[torch.Tensor, list[torch.Tensor]]], layer: int,
                 calibration: list[torch.Tensor] | None = None):
        self.layer = layer
        self.folds = folds  # [(contrast [n_c, d] fp16 unit vectors, negatives: per held-out text [n_i, d])]
        self.calibration = calibration  # per calibration text [n_i, d]; None for a state of session 12
        self.keys = torch.zeros(0, folds[0][0].shape[1], dtype=torch.float16)
        self.thresholds = [float("inf")] * len(folds)  # nothing written: everything goes to the base

    @classmethod
    def from_calibration(cls, hidden: list[torch.Tensor], layer: int) -> "Router":
        k = cls.FOLDS
        folds = [(torch.cat([h for i, h in enumerate(hidden) if i % k != f]), [h for i, h in enumerate(hidden) if i % k == f])
                 for f in range(k)]
        return cls(folds, layer, list(hidden))

    @classmethod
    def calibrate(cls, model, tokenizer, base_texts: list[str], layer: int) -> "Router":
        if len(base_texts) < cls.FOLDS:
            raise ValueError(f"the router needs at least {cls.FOLDS} base-written texts to calibrate, got {len(base_texts)}")
        return cls.from_calibration(base_hidden(model, tokenizer, base_texts, layer), layer)

    @property
    def threshold(self) -> float:
        """The score above which an input goes through the adapters (inf while nothing is written)."""
        return 0.0 if len(self.keys) else float("inf")

    def _margin(self, h: torch.Tensor, contrast: torch.Tensor, near: torch.Tensor | None = None) -> float:
        """The largest token margin of one text's unit hidden states h [n, d] against a contrast set;
        `near` [n], each token's best cosine to a key, when the caller already has it."""
        if len(h) == 0 or len(self.keys) == 0:
            return -2.0
        h = h.float()
        near = (h @ self.keys.float().T).amax(1) if near is None else near
        return float((near - (h @ contrast.float().T).amax(1)).max())

    def score(self, hidden: list[torch.Tensor]) -> list[float]:
        """Per text, the mean over folds of (largest token margin - the fold's threshold)."""
        if not len(self.keys):
            return [float("-inf")] * len(hidden)
        out = []
        for h in hidden:  # the keys' side of the margin is the same in every fold: computed once
            near = (h.float() @ self.keys.float().T).amax(1) if len(h) else None
            out.append(sum(self._margin(h, c, near) - t for (c, _), t in zip(self.folds, self.thresholds)) / len(self.folds))
        return out

    def add(self, hidden: list[torch.Tensor]) -> None:
        """Store the written texts' token keys; each fold's threshold is re-measured on its negatives."""
        self.keys = torch.cat([self.keys] + [h.half() for h in hidden])
        if len(self.keys):
            self.thresholds = [max((self._margin(n, c) for n in neg), default=float("inf")) for c, neg in self.folds]

    def route(self, hidden: list[torch.Tensor]) -> list[bool]:
        return [s > self.threshold for s in self.score(hidden)]

    def state_dict(self) -> dict:
        if self.calibration is not None:
            return {"layer": self.layer, "calibration": self.calibration, "keys": self.keys}
        (c, neg), = self.folds
        return {"layer": self.layer, "contrast": c, "negatives": neg, "keys": self.keys}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "Router":
        if "calibration" in sd:
            r = cls.from_calibration(list(sd["calibration"]), int(sd["layer"]))
        else:  # session 12: one contrast set and one set of held-out negatives
            r = cls([(sd["contrast"], list(sd["negatives"]))], int(sd["layer"]))
        r.add([sd["keys"]])
        return r

    def nbytes(self) -> int:
        """Keys plus calibration hidden states (each stored once)."""
        cal = self.calibration if self.calibration is not None else [self.folds[0][0], *self.folds[0][1]]
        return 2 * (self.keys.numel() + sum(h.numel() for h in cal))
