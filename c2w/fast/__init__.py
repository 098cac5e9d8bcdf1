"""The hot paths every number is paid with: the write step's loss and probe scoring.

`lm_loss`, `greedy_decode` and `answer_logprobs` are the entry points the rest of c2w calls
(`decode_and_logprobs` does the last two from one shared prefill; `make_optimizer` is the fused
AdamW for write steps); `c2w perf` measures them against a plain transformers + PEFT loop.
"""

from c2w.fast.loss import lm_loss
from c2w.fast.decode import answer_logprobs, answer_token_ids, decode_and_logprobs, greedy_decode
from c2w.fast.optim import make_optimizer

__all__ = ["lm_loss", "greedy_decode", "answer_logprobs", "answer_token_ids", "decode_and_logprobs", "make_optimizer"]
