"""The benchmark/demo profile: read once, misspelt keys refused, paths relative to the profile's folder."""
import csv
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from par.app.profile import Profile
from par.config import load_yaml
from par.errors import ParError

MICRO = Path(REPO, "configs", "micro")


def _write(folder: Path, **values) -> Path:
    """A micro profile in ``folder`` with ``values`` on top; its stage files are the repo's (absolute)."""
    profile = {**load_yaml(f"{REPO}/configs/micro-bench.yaml"), "foundation": str(MICRO / "foundation.yaml"),
               "poison_finetune": str(MICRO / "poison.yaml"), "clean": str(MICRO / "par.yaml"), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def _error(path: Path) -> str:
    with pytest.raises(ParError) as e:
        Profile.load(path)
    assert "\n" not in str(e.value)  # one line
    return str(e.value)


def test_an_unknown_key_is_named_with_the_known_ones(tmp_path):
    message = _error(_write(tmp_path, sweep_attack=["badnet_rs"]))
    assert "unknown profile key(s) ['sweep_attack']" in message and "'sweep_attacks'" in message


def test_an_unknown_key_in_quick_is_refused_as_the_profile_is_read(tmp_path):
    message = _error(_write(tmp_path, quick={"attacks": ["badnet_rs"], "seed": [0]}))
    assert "unknown profile 'quick' key(s) ['seed']" in message and "'seeds'" in message
    assert "'quick'" not in message.split("known keys:")[1]  # quick holds profile keys, not itself
    # its values are read as those keys would be: a stage file that is not there, before anything runs
    message = _error(_write(tmp_path, quick={"clean": "nowhere/par.yaml"}))
    assert "profile key 'clean': no file nowhere/par.yaml" in message


def test_an_unknown_key_in_synthetic_cleaning_or_robust_is_named(tmp_path):
    world = {"seed": 1, "style": "sketch", "image_size": 32, "train": 0, "clean": 64, "test": 0}
    message = _error(_write(tmp_path, synthetic_cleaning={"world": world, "defense": ["par"]}))
    assert message == ("unknown profile 'synthetic_cleaning' key(s) ['defense']; known keys: ['defenses', 'world']")
    message = _error(_write(tmp_path, robust={"eps": ["4/255"], "step": 3}))
    assert "unknown profile 'robust' key(s) ['step']" in message and "'steps'" in message
    message = _error(_write(tmp_path, synthetic_cleaning={"world": {**world, "colour": "red"}}))
    assert "unknown profile 'synthetic_cleaning.world' key(s) ['colour']" in message


def test_scan_settings_are_read_under_the_scanners_registered_names_and_checked_before_any_work(tmp_path):
    profile = Profile.load(_write(tmp_path / "a", scan={"scanners": ["inversion", "decree"],
                                                         "scanner_params": {"label_inversion": {"steps": 7}}}))
    assert profile.scan.scanners == ["label-inversion", "decree"]
    assert profile.scan.scanner_params == {"label-inversion": {"steps": 7}}
    message = _error(_write(tmp_path / "b", scan={"scanners": ["decree"], "scanner_params": {"inversion": {"steps": 7}}}))
    assert "settings for ['label-inversion'], which its scanners ['decree'] do not list" in message
    message = _error(_write(tmp_path / "c", scan={"scanners": ["decree"], "scanner_params": {"decree": {"stepz": 7}}}))
    assert "scanner_params of 'decree'" in message and "stepz" in message


def test_attacks_and_defenses_are_read_under_their_registered_names_in_lists_and_as_keys(tmp_path):
    profile = Profile.load(_write(tmp_path / "a", attacks=["badnet-stripes", "random"],
                                  attack_params={"badnet-stripes": {"patch_size": 6}}, poison_rates={"BadNet": 0.01},
                                  defense_settings={"PAR": {"lr": 1e-5}}))
    assert profile.attacks == ["badnet_rs", "random"] and profile.attack_params == {"badnet_rs": {"patch_size": 6}}
    assert profile.poison_rates == {"random": 0.01} and set(profile.defense_settings) == {"par"}
    assert "names ['random'] more than once" in _error(_write(tmp_path / "b", attacks=["badnet", "random"]))
    assert "names one attack" in _error(_write(tmp_path / "c", poison_rates={"badnet": 0.01, "random": 0.05}))
    assert "unknown attack 'badnet-strips'" in _error(_write(tmp_path / "d", attack_params={"badnet-strips": {}}))
    assert "lists a seed twice" in _error(_write(tmp_path / "e", seeds=[0, 0]))


def test_misspelt_stage_or_evaluation_settings_are_refused_as_the_profile_is_read(tmp_path):
    message = _error(_write(tmp_path / "a", eval={"bach_size": 256}))
    assert "unknown profile 'eval' key(s) ['bach_size']" in message
    message = _error(_write(tmp_path / "b", clean={"steps": 2, "lr_warmup": 3}))
    assert "unknown profile 'clean' key(s) ['lr_warmup']" in message


def test_misspelt_poisoning_or_attack_preparation_is_refused_as_the_profile_is_read(tmp_path):
    """Used once the foundation has trained: refused before, each in one line."""
    assert "profile 'poison' has unknown setting(s) ['rat']" in _error(_write(tmp_path / "a", poison={"rat": 0.1}))
    assert "rate" in _error(_write(tmp_path / "b", poison_rates={"blended": 1.5}))  # a share of the pairs
    message = _error(_write(tmp_path / "c", attack_prepare={"badclip": {"step": 200}}))
    assert "badclip attack_prepare has unknown setting(s) ['step']" in message
    message = _error(_write(tmp_path / "d", attack_prepare={"blended": {"steps": 10}}))
    assert "attack 'blended' builds nothing before poisoning" in message
    Profile.load(_write(tmp_path / "e", attack_prepare={"badclip": {"steps": 10, "lr": 0.05}}))


def test_a_stage_path_that_does_not_resolve_names_the_key_and_the_path(tmp_path):
    message = _error(_write(tmp_path, foundation="micro/foundation.yaml"))  # relative to the profile, not the repo
    assert message.startswith("profile key 'foundation': no file micro/foundation.yaml")
    assert str(tmp_path / "micro" / "foundation.yaml") in message
    message = _error(_write(tmp_path, defense_settings={"ft": "ft.yaml"}))
    assert message.startswith("profile key 'defense_settings.ft': no file ft.yaml")
    message = _error(_write(tmp_path, foundation_checkpoint="clean.pt"))
    assert message.startswith("profile key 'foundation_checkpoint': no file clean.pt")


def test_relative_paths_resolve_against_the_profiles_folder_from_any_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    (folder / "stages").mkdir(parents=True)
    for name in ("foundation", "poison", "par"):
        shutil.copy(MICRO / f"{name}.yaml", folder / "stages" / f"{name}.yaml")
    (folder / "stages" / "ft.yaml").write_text("objective_params: {train_logit_scale: false}\n")
    path = _write(folder, foundation="stages/foundation.yaml", poison_finetune="stages/poison.yaml",
                  clean="stages/par.yaml", defense_settings={"ft": "stages/ft.yaml"}, cache="../cache",
                  attacks=["badnet_rs"], defenses=["ft"], synthetic_cleaning=None, sweeps={}, reference=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    profile = Profile.load(path)
    assert profile.foundation == load_yaml(MICRO / "foundation.yaml")
    assert profile.clean == load_yaml(MICRO / "par.yaml")
    assert profile.defense_settings == {"ft": {"objective_params": {"train_logit_scale": False}}}
    assert profile.cache == (tmp_path / "cache").resolve()

    from par.app.bench import run_bench

    run_bench(profile, str(tmp_path / "out"), progress=False)  # an in-memory Profile
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(r["attack"], r["defense"], r["status"]) for r in rows] == [("badnet_rs", "ft", "ok")]
    assert len(list((tmp_path / "cache").glob("foundation-*/checkpoint.pt"))) == 1  # the cache beside the profile
    assert not list(elsewhere.iterdir())  # nothing written where the command ran


def test_absolute_paths_stay_as_they_are(tmp_path):
    profile = Profile.load(_write(tmp_path / "a", cache=str(tmp_path / "shared")))
    assert profile.cache == (tmp_path / "shared").resolve()
    assert profile.poison_finetune == load_yaml(MICRO / "poison.yaml")


def test_the_shipped_profiles_keep_their_stage_folders(monkeypatch, tmp_path):
    """The benchmark's and the demo's cache is the repo's runs/cache, as it was when read from the repo's
    root: a stage's folder name digests its settings, and the foundation's path is one of them."""
    monkeypatch.chdir(tmp_path)
    for name in ("bench", "demo"):
        profile = Profile.load(Path(REPO, "configs", f"{name}.yaml"))
        assert profile.cache == Path(REPO, "runs", "cache").resolve()
        assert profile.foundation == load_yaml(Path(REPO, "configs", "demo", "foundation.yaml"))


def test_the_quick_variant_replaces_only_its_keys():
    profile = Profile.load(f"{REPO}/configs/micro-bench.yaml")
    quick = profile.quick_profile()
    assert (profile.attacks, profile.sweeps) == (["badnet_rs", "blended"], {"par": {"objective_params.tau": [1.0]}})
    assert (quick.attacks, quick.sweeps) == (["badnet_rs"], {})
    assert replace(quick, attacks=profile.attacks, sweeps=profile.sweeps) == profile


def test_an_empty_key_means_its_default(tmp_path):
    profile = Profile.load(_write(tmp_path, attack_params=None, seeds=None, robust={}))
    assert profile.attack_params == {} and profile.seeds == [0] and profile.robust is None


def test_extends_starts_from_another_profile_whose_paths_stay_its_own(tmp_path):
    stages = tmp_path / "main" / "stages"
    stages.mkdir(parents=True)
    shutil.copy(MICRO / "par.yaml", stages / "par.yaml")
    (stages / "ft.yaml").write_text("objective_params: {train_logit_scale: false}\n")
    main = _write(tmp_path / "main", clean="stages/par.yaml", cache="../cache", defense_settings={"ft": "stages/ft.yaml"},
                  seeds=[0, 1], robust={"eps": ["2/255"]})
    side = tmp_path / "side" / "fare.yaml"  # another folder: the main profile's relative paths must not move
    side.parent.mkdir()
    side.write_text(f"extends: {main}\ndefenses: [fare]\nseeds: [0]\nrobust: null\n"
                    "quick: {attacks: [blended]}\n")
    profile, base = Profile.load(side), Profile.load(main)
    assert (profile.defenses, profile.seeds, profile.robust) == (["fare"], [0], None)  # replaced, or dropped by null
    assert profile.clean == load_yaml(MICRO / "par.yaml") and profile.cache == (tmp_path / "cache").resolve()
    assert profile.defense_settings == base.defense_settings == {"ft": {"objective_params": {"train_logit_scale": False}}}
    assert (profile.attacks, profile.world, profile.poison) == (base.attacks, base.world, base.poison)
    assert profile.quick_profile().attacks == ["blended"]
    # a chain of two works; a missing file, a loop and a misspelt key each end in one line
    (tmp_path / "side" / "again.yaml").write_text("extends: fare.yaml\nseeds: [3]\n")
    assert Profile.load(tmp_path / "side" / "again.yaml").defenses == ["fare"]
    (tmp_path / "side" / "gone.yaml").write_text("extends: nowhere.yaml\n")
    assert _error(tmp_path / "side" / "gone.yaml").startswith("profile key 'extends': no file nowhere.yaml")
    (tmp_path / "side" / "loop.yaml").write_text("extends: loop.yaml\n")
    assert "extends itself" in _error(tmp_path / "side" / "loop.yaml")
    (tmp_path / "side" / "typo.yaml").write_text(f"extends: {main}\nseed: [0]\n")
    assert "'seed'" in _error(tmp_path / "side" / "typo.yaml")


def test_an_inherited_quick_part_keeps_its_paths_relative_to_its_own_file(tmp_path):
    (tmp_path / "main" / "stages").mkdir(parents=True)
    (tmp_path / "main" / "stages" / "short.yaml").write_text("steps: 3\n")
    main = _write(tmp_path / "main", quick={"clean": "stages/short.yaml", "cache": "quick-cache",
                                            "defense_settings": {"ft": "stages/short.yaml"}})
    side = tmp_path / "side" / "fare.yaml"
    side.parent.mkdir()
    side.write_text(f"extends: {main}\ndefenses: [fare]\n")
    quick = Profile.load(side).quick_profile()  # read against side/ it would name side/stages/short.yaml: no file
    assert quick.clean == {"steps": 3} and quick.defense_settings == {"ft": {"steps": 3}}
    assert quick.cache == (tmp_path / "main" / "quick-cache").resolve()


def test_the_side_benchmarks_extend_the_main_one():
    main = Profile.load(Path(REPO, "configs", "bench.yaml"))
    for side in ("fare", "eftclip", "tau", "synthetic"):
        profile = Profile.load(Path(REPO, "configs", f"bench-{side}.yaml"))
        assert (profile.world, profile.poison_rates, profile.clean, profile.cache, profile.poison_finetune) == \
            (main.world, main.poison_rates, main.clean, main.cache, main.poison_finetune)
        assert profile.scan is None and set(profile.defenses).isdisjoint({"invert", "par+invert"})
        assert profile.jobs == main.jobs == 2  # the same one-thread models as the main matrix's


def test_a_key_dropped_by_an_extending_profile_stays_dropped_in_the_quick_run_it_inherits(tmp_path):
    main = _write(tmp_path / "main", quick={"attacks": ["badnet_rs"], "synthetic_cleaning": None,
                                            "seeds": [5]})
    side = tmp_path / "side.yaml"
    side.write_text(f"extends: {main}\nseeds: null\n")  # no quick of its own: the main one's
    quick = Profile.load(side).quick_profile()
    assert quick.seeds == [0] and quick.attacks == ["badnet_rs"]  # the dropped key, not the inherited quick's [5]
