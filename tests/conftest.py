import pytest


@pytest.fixture(scope="session")
def tiny():
    """A random-init Llama of SmolLM2's layout with SmolLM2's tokenizer (no real weights)."""
    from c2w.backbone import load_backbone

    return load_backbone("tiny", device="cpu", seed=0)
