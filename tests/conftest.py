import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/trees.py

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per xdist worker: `-n 2` on 2 cores otherwise runs 4 spinning OpenMP threads, which makes
    # the many small convolutions of the tests several times slower
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    """Random tiny SD components (core.models.architectures 'tiny'), built once per test module."""
    from core.models import build_random

    comp = build_random("tiny", seed=0)
    comp.unet.eval(), comp.vae.eval(), comp.text_encoder.eval()
    return comp


@pytest.fixture(scope="module")
def bottle_world(tmp_path_factory):
    """A tiny synthetic world (64 px, bottle only, 3 train normals, 3 anomalies per type) at the default root shape
    .../synthetic/seed0_res64, built once per test module."""
    import core.data.synthetic as S

    root = tmp_path_factory.mktemp("world") / "synthetic" / "seed0_res64"
    S.build_world(root, S.WorldConfig(resolution=64, n_train_good=3, n_test_good=1, n_per_type=3,
                                      products=("bottle",)), workers=1, progress=False)
    return root
