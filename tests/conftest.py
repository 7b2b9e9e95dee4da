import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_error(capsys, argv) -> str:
    """Runs the CLI in process; asserts exit status 2 and exactly one 'error:' line, the last on stderr."""
    from par.app.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()  # progress bars may come first
    assert code == 2, err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    """A small synthetic world (32 px) shared by the tests that need real files."""
    from par.synthetic import WorldConfig, make_world

    out = tmp_path_factory.mktemp("world")
    make_world(WorldConfig(seed=3, image_size=32, train=96, clean=48, test=48, workers=1), out, progress=False)
    return out
