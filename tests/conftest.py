import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stop_before_checkpoint(*args):
    """Patched over ``par.train.finish``: a run stopped after its last state, before its checkpoint."""
    raise KeyboardInterrupt


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


@pytest.fixture(scope="session")
def micro_cache(tmp_path_factory):
    """One profile ``cache`` for the whole test run: a micro profile's world, foundation, poisoned models and
    their evaluations are built once, by the first test that needs them, and reused by every other."""
    return tmp_path_factory.mktemp("cache")


def micro_profile(name: str, cache, **changes):
    """``configs/<name>`` read as a Profile with the shared ``cache`` and ``changes`` (YAML-like values)."""
    from par.app.profile import Profile
    from par.config import load_yaml

    return Profile.from_mapping({**load_yaml(f"{REPO}/configs/{name}"), "cache": str(cache), **changes},
                                f"{REPO}/configs")


class Backdoored:
    """configs/micro-backdoor.yaml built: its world, clean foundation and poisoned model (a fixed 8-px
    BadNet-Stripes patch toward ``label``, really learnt)."""

    def __init__(self, profile, out):
        from par.app import pipeline

        self.profile, self.attack, self.label = profile, profile.attack, profile.label
        self.world = pipeline.make_world_stage(profile, out)
        self.foundation, _ = pipeline.foundation_stage(profile, out, self.world)
        self.attack_params = pipeline.prepare_attack_stage(profile, out, self.world, self.attack, self.label,
                                                           dict(profile.attack_params.get(self.attack) or {}))
        self.poisoned = pipeline.poisoned_model_stage(profile, out, self.world, self.attack, self.label,
                                                      self.attack_params)

    def job(self, out, defense_settings=None, checkpoint=None, steps=None):
        """A cleaning job of the poisoned model (or ``checkpoint``) on the world's clean pairs with the
        profile's cleaning budget, ``steps`` shorter when given."""
        from par.app import pipeline
        from par.defenses import CleaningJob

        world = self.world.path
        settings = {**self.profile.clean, "progress": False, **(defense_settings or {})}
        if steps:
            settings.update(steps=steps, warmup=min(settings.get("warmup", 0), steps - 1))
        return CleaningJob(checkpoint=str(checkpoint or self.poisoned.checkpoint), model=self.world.model,
                           train_data=str(world / "clean.csv"), out=str(out),
                           settings={**pipeline.IN_MEMORY, **settings}, classnames=str(world / "classnames.txt"),
                           templates=str(world / "templates.txt"))

    def evaluate(self, checkpoint) -> dict:
        from par.app import pipeline

        return pipeline.evaluate_stage(self.world, checkpoint, self.attack, self.label, self.attack_params,
                                       self.profile.eval)


@pytest.fixture(scope="session")
def backdoored_micro(micro_cache, tmp_path_factory) -> Backdoored:
    return Backdoored(micro_profile("micro-backdoor.yaml", micro_cache), tmp_path_factory.mktemp("backdoored"))


@pytest.fixture(scope="session")
def poisoned_scan(backdoored_micro, tmp_path_factory):
    """The poisoned micro model scanned once, as ``invert`` asks (its scan stage alone, on the clean pairs'
    images): (what the stage found, the scan folder). The scan tests read its record; the invert tests reuse
    the folder where a run or the scan table would leave it."""
    from par.defenses import DEFENSES

    found = DEFENSES.get("invert").scan(backdoored_micro.job(tmp_path_factory.mktemp("scanned") / "run", steps=2), {})
    return found, Path(found["folder"])
