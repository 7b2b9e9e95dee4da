import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """A small synthetic world (32 px) shared by the tests that need real files."""
    from par.synthetic import WorldConfig, make_world

    out = tmp_path_factory.mktemp("world")
    make_world(WorldConfig(seed=3, image_size=32, train=96, clean=48, test=48, workers=1), out, progress=False)
    return out
