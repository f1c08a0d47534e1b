import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/trees.py

import pytest


@pytest.fixture(scope="module")
def tiny():
    """Random tiny SD components (core.models.architectures 'tiny'), built once per test module."""
    from core.models import build_random

    comp = build_random("tiny", seed=0)
    comp.unet.eval(), comp.vae.eval(), comp.text_encoder.eval()
    return comp
