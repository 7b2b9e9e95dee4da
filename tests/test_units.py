"""Small pieces checked against values worked out by hand: the erase augmentation, the registry, config coercion."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from par import config, plugins
from par.defenses.par import erase_local_mean
from par.errors import ParError
from par.registry import Registry


# erase_local_mean ----------------------------------------------------------------------------------


def test_erase_replaces_one_square_by_its_own_mean():
    images = torch.arange(2 * 3 * 20 * 20, dtype=torch.float32).reshape(2, 3, 20, 20)
    out = erase_local_mean(images, p=1.0, area=(0.09, 0.09), generator=torch.Generator().manual_seed(0))
    changed = (out != images).any(dim=1)  # [B, H, W]
    for b in range(2):
        rows, cols = changed[b].nonzero(as_tuple=True)
        # 0.09 of 400 px is a 6 x 6 square (the values are all distinct, so every erased pixel changes)
        assert rows.max() - rows.min() + 1 == 6 and cols.max() - cols.min() + 1 == 6
        assert changed[b].sum() == 36
        top, left = rows.min(), cols.min()
        square = images[b, :, top:top + 6, left:left + 6]
        expected = square.mean(dim=(1, 2))
        assert torch.allclose(out[b, :, top, left], expected)
        assert torch.allclose(out[b, :, top + 5, left + 5], expected)
        assert torch.equal(out[b][:, ~changed[b]], images[b][:, ~changed[b]])


def test_erase_with_p_zero_is_identity_and_same_generator_same_result():
    images = torch.rand(4, 3, 16, 16)
    assert torch.equal(erase_local_mean(images, p=0.0, generator=torch.Generator().manual_seed(1)), images)
    a = erase_local_mean(images, p=0.5, generator=torch.Generator().manual_seed(7))
    b = erase_local_mean(images, p=0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_erase_square_is_at_least_one_pixel_and_keeps_the_mean_of_what_it_covers():
    images = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = erase_local_mean(images, p=1.0, area=(0.001, 0.001), generator=torch.Generator().manual_seed(0))
    # a square below one pixel is one pixel, whose mean is the pixel itself: nothing changes, nothing breaks
    assert torch.equal(out, images)
    out = erase_local_mean(images, p=1.0, area=(0.25, 0.25), generator=torch.Generator().manual_seed(0))
    changed = out != images
    assert int(changed.sum()) == 4 and out[changed].unique().numel() == 1  # a 2 x 2 square, one value ...
    assert float(out.sum()) == pytest.approx(float(images.sum()))  # ... its own mean


# Registry ------------------------------------------------------------------------------------------


def test_registry_lookup_is_case_and_dash_insensitive_and_knows_aliases():
    reg = Registry("widget")
    reg.register("badnet_rs", "badnet-stripes")(1)
    reg.add("blended", 2)
    assert reg.get("BadNet-RS") == 1 and reg.get("badnet_stripes") == 1
    assert reg.canonical("BLENDED") == "blended"
    assert "Badnet-Stripes" in reg and "wanet" not in reg
    assert reg.names() == ["badnet_rs", "blended"] and reg.in_order() == ["badnet_rs", "blended"]
    assert list(reg) == ["badnet_rs", "blended"]


def test_registry_rejects_a_second_registration_under_any_spelling():
    reg = Registry("widget")
    reg.add("blended", 1, "blend")
    with pytest.raises(ParError, match="already registered"):
        reg.add("Blend", 2)


def test_registry_unknown_name_lists_the_known_ones():
    reg = Registry("widget")
    reg.add("b", 1)
    reg.add("a", 2)
    with pytest.raises(ParError, match=r"unknown widget 'c'; known: a, b"):
        reg.get("c")


def test_registry_lazy_entry_is_imported_on_first_lookup_only():
    reg = Registry("widget")
    reg.lazy("dumps", "json:dumps", "to_json")
    assert type(reg._items["dumps"]).__name__ == "_Lazy"
    import json

    assert reg.get("to-json") is json.dumps
    assert reg._items["dumps"] is json.dumps


def test_registry_imports_user_plugins_for_an_unknown_name(tmp_path, monkeypatch):
    from par.triggers import TRIGGERS

    (tmp_path / "my_par_plugin.py").write_text(
        "from par.triggers import TRIGGERS\n"
        "TRIGGERS.add('unit_test_plugin_trigger', object())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PAR_PLUGINS", "my_par_plugin")
    monkeypatch.setattr(plugins, "_loaded", False)
    try:
        assert TRIGGERS.canonical("unit-test-plugin-trigger") == "unit_test_plugin_trigger"
    finally:
        TRIGGERS._items.pop("unit_test_plugin_trigger", None)
        TRIGGERS._aliases.pop("unit_test_plugin_trigger", None)


def test_a_plugin_that_fails_to_import_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PAR_PLUGINS", "no_such_par_plugin_module")
    monkeypatch.setattr(plugins, "_loaded", False)
    for _ in range(2):  # every time: not a registry silently missing the plugins after the first try
        with pytest.raises(ParError, match="no_such_par_plugin_module"):
            plugins.load_plugins()


def test_plugins_are_listed_with_the_built_ins_without_a_lookup_first(tmp_path, monkeypatch):
    from par.triggers import TRIGGERS

    (tmp_path / "my_listed_plugin.py").write_text(
        "from par.triggers import TRIGGERS\nTRIGGERS.add('unit_test_listed_trigger', object())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PAR_PLUGINS", "my_listed_plugin")
    monkeypatch.setattr(plugins, "_loaded", False)
    try:
        assert TRIGGERS.in_order()[-1] == "unit_test_listed_trigger"  # e.g. the benchmark's "every attack"
    finally:
        TRIGGERS._items.pop("unit_test_listed_trigger", None)
        TRIGGERS._aliases.pop("unit_test_listed_trigger", None)


def test_a_registry_whose_built_ins_fail_to_import_fails_the_same_way_every_time():
    reg = Registry("thing", builtins="no_such_par_builtins_package")
    for _ in range(2):
        with pytest.raises(ModuleNotFoundError, match="no_such_par_builtins_package"):
            reg.canonical("anything")


# config --------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    name: str
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False
    folder: Optional[str] = None
    sizes: List[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@pytest.mark.parametrize("hint, value, expected", [
    (float, "2e-4", 2e-4),
    (float, 3, 3.0),
    (int, "5", 5),
    (int, 5.0, 5),
    (int, "1e3", 1000),
    (bool, True, True),
    (str, 32, "32"),
    (Optional[str], None, None),
    (Optional[int], "7", 7),
    (List[int], ["1", 2.0], [1, 2]),
    (dict, {"a": 1}, {"a": 1}),
    (Dict[str, float], {"badclip": "1e-2"}, {"badclip": 0.01}),
    (Dict[str, dict], {"par": {"lr": "1e-4"}}, {"par": {"lr": "1e-4"}}),  # a stage's own build reads it
])
def test_coerce_converts_what_yaml_and_the_command_line_give(hint, value, expected):
    out = config._coerce(value, hint, "k", "test")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("hint, value", [
    (int, 2.5),      # would silently truncate
    (int, True),     # bool is not a step count
    (float, False),
    (bool, "yes"),   # strings are not booleans
    (str, True),
    (List[int], 3),
    (dict, [1]),
    (int, "ten"),
    (int, float("inf")),  # int(inf) overflows: an error naming the key, not a traceback
])
def test_coerce_rejects_values_of_the_wrong_kind(hint, value):
    with pytest.raises(ParError, match="'k'"):
        config._coerce(value, hint, "k", "test")


def test_coerce_names_the_entry_of_a_mapping_that_is_of_the_wrong_kind():
    with pytest.raises(ParError, match="key 'poison_rates.badclip' must be float, got 'often'"):
        config._coerce({"badclip": "often"}, Dict[str, float], "poison_rates", "profile")


def test_coerce_rejects_empty_for_a_required_type():
    with pytest.raises(ParError, match="may not be empty"):
        config._coerce(None, float, "lr", "test")


def test_build_names_unknown_and_missing_keys_and_coerces():
    s = config.build(_Settings, {"name": "x", "lr": "1e-4", "steps": "3", "sizes": [1]})
    assert s == _Settings(name="x", lr=1e-4, steps=3, sizes=[1])
    with pytest.raises(ParError, match=r"unknown test key\(s\) \['stepz'\]"):
        config.build(_Settings, {"name": "x", "stepz": 3}, "test")
    with pytest.raises(ParError, match=r"lacks required key\(s\) \['name'\]"):
        config.build(_Settings, {"lr": 1.0}, "test")


def test_parse_overrides_reads_yaml_values_both_spellings():
    got = config.parse_overrides(["--lr", "1e-3", "--wd", "0.1", "--steps=5", "--train-data", "a.csv", "--flag", "true", "--x", ""])
    assert got == {"lr": "1e-3", "wd": 0.1, "steps": 5, "train_data": "a.csv", "flag": True, "x": None}
    with pytest.raises(ParError, match="needs a value"):
        config.parse_overrides(["--lr"])
    with pytest.raises(ParError, match="expected --key value"):
        config.parse_overrides(["lr", "1"])


def test_merge_sets_dotted_keys_without_touching_the_input():
    base = {"lr": 1.0, "objective_params": {"tau": 2.0}}
    out = config.merge(base, {"objective_params.tau": 1.0, "new.deep.key": 3, "lr": 2.0})
    assert out == {"lr": 2.0, "objective_params": {"tau": 1.0}, "new": {"deep": {"key": 3}}}
    assert base == {"lr": 1.0, "objective_params": {"tau": 2.0}}
    with pytest.raises(ParError, match="'lr' is not a mapping"):
        config.merge(base, {"lr.x": 1})


def test_run_folder_reuses_runs_recorded_before_an_unset_setting_existed(tmp_path):
    import json

    from par.distributed import Dist
    from par.runs import RunFolder

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    (out / "fingerprint.json").write_text(json.dumps({"lr": 0.001, "image_root": None, **_finished(out)}))
    found = RunFolder(out, {"lr": 0.001, "image_root": None, "train_classnames": None}, Dist(), reuse=True)
    assert found.status == "finished"  # a setting added later, unset, does not change what the run was
    with pytest.raises(ParError, match=r"differs in \['train_classnames'\]"):
        RunFolder(out, {"lr": 0.001, "image_root": None, "train_classnames": "imagenet"}, Dist(), reuse=True)
    with pytest.raises(ParError, match=r"differs in \['lr'\]"):
        RunFolder(out, {"lr": 0.002, "image_root": None}, Dist(), reuse=True)


def _finished(out):
    """The record a finished run leaves in its fingerprint (the checkpoint it finished with)."""
    from par.utils import file_digest

    return {"finished": {"step": 1, "checkpoint_digest": file_digest(out / "checkpoint.pt")}}


def test_run_folder_knows_an_input_by_its_digest_not_its_path_spelling(tmp_path):
    import json

    from par.distributed import Dist
    from par.runs import RunFolder

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    (out / "fingerprint.json").write_text(json.dumps({"train_data": "runs/x/train.csv", "train_data_digest": "abc",
                                                            **_finished(out)}))
    same = {"train_data": str(Path.cwd() / "runs/x/train.csv"), "train_data_digest": "abc"}  # another spelling
    assert RunFolder(out, same, Dist(), reuse=True).status == "finished"
    with pytest.raises(ParError, match=r"differs in \['train_data', 'train_data_digest'\]"):
        RunFolder(out, {**same, "train_data_digest": "def"}, Dist(), reuse=True)


def test_file_lock_makes_a_second_process_wait_its_turn(tmp_path):
    """Two benchmark cells side by side that need the same scan: the second waits until the first is done."""
    import subprocess
    import sys
    import time

    from par.utils import file_lock

    lock, marks = tmp_path / "shared.lock", tmp_path / "marks.txt"
    holder = ("import sys, time; from par.utils import file_lock\n"
              f"with file_lock({str(lock)!r}):\n"
              f"    open({str(marks)!r}, 'a').write('held\\n'); sys.stdout.write('in\\n'); sys.stdout.flush(); time.sleep(1.5)\n"
              f"    open({str(marks)!r}, 'a').write('released\\n')\n")
    child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert child.stdout.readline() == "in\n"  # the other process holds the lock now
    started = time.monotonic()
    with file_lock(lock):
        waited = time.monotonic() - started
        open(marks, "a").write("second\n")
    assert child.wait(timeout=30) == 0
    assert marks.read_text().splitlines() == ["held", "released", "second"] and waited > 0.5


def test_label_mentions_over_many_labels_agree_with_mentions_label_one_by_one():
    from open_clip import IMAGENET_CLASSNAMES

    from par.data import LabelMentions, mentions_label

    labels = list(IMAGENET_CLASSNAMES) + ["bus", "box", "-dash", "t-shirt", "banana"]
    captions = ["Two bananas and a tench.", "geese near the computer mice", "three buses, boxes of t-shirts",
                "a goldfish-shaped kite", "the -dash sign", "a house with a sea lion", "nothing here", "",
                "Great White Sharks and a hammerhead shark", "crane, crane and cranes"]
    mentions = LabelMentions(labels)
    for caption in captions:
        assert mentions(caption) == [i for i, label in enumerate(labels) if mentions_label(caption, label)], caption
    assert [labels[i] for i in mentions("geese near the computer mice")] == ["goose", "computer mouse"]


def test_a_caption_mentions_a_label_as_a_word_or_its_plural():
    from par.data import mentions_label

    assert mentions_label("Two bananas on a table", "banana") and mentions_label("three buses", "bus")
    assert mentions_label("a box", "box") and mentions_label("boxes stacked", "box")
    assert not mentions_label("a bush", "bus") and not mentions_label("carpet", "car")
    assert mentions_label("Geese on a lake", "goose") and mentions_label("two computer mice", "computer mouse")
    assert mentions_label("people walking", "person") and mentions_label("butterflies", "butterfly")
    assert mentions_label("a pack of wolves", "wolf") and not mentions_label("a wolfhound", "wolf")
    assert not mentions_label("mice", "computer mouse") and not mentions_label("geeser", "goose")


def test_a_path_list_gives_back_the_paths_it_was_given():
    from pathlib import Path

    from par.data import PathList

    paths = [Path("/data/a.jpg"), Path("rel/ü ñ.png"), Path("/x/" + "y" * 200 + ".jpg")]
    kept = PathList(paths)
    assert len(kept) == 3 and list(kept) == paths and kept[-1] == paths[-1] and kept[1:] == paths[1:]
    assert isinstance(kept[0], Path) and len(PathList([])) == 0
