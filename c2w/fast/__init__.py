"""The hot paths every number is paid with: the write step's loss and probe scoring.

`lm_loss`, `greedy_decode` and `answer_logprobs` are the only entry points the rest of c2w calls;
`c2w perf` measures them against a plain transformers + PEFT loop.
"""

from c2w.fast.loss import lm_loss
from c2w.fast.decode import answer_logprobs, greedy_decode

__all__ = ["lm_loss", "greedy_decode", "answer_logprobs"]
