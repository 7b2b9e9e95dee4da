"""A new fine-tuning defense is one class and one decorator: it then shows up in ``python -m par clean
--help``, runs in the benchmark and gets its columns in the benchmark's table, with no other edit."""
import csv

import pytest

from conftest import micro_profile
from par.app.bench import run_bench
from par.app.cli import main
from par.defenses import DEFENSES, OBJECTIVES, Objective, defense
from par.errors import ParError


@pytest.fixture(scope="module")
def halfclip():
    """Registers the defense the way a user's module would, and unregisters it after this module's tests."""

    @defense("halfclip")
    class HalfCLIP(Objective):
        """The CLIP loss at half weight: a defense nobody would ship, defined where the tests are."""

        def __call__(self, model, batch):
            image, text, scale = model(batch.images, batch.tokens)
            return {"loss": 0.5 * self.context.contrastive(image, text, scale)}

    yield "halfclip"
    DEFENSES.remove("halfclip")
    OBJECTIVES.remove("halfclip")


def test_it_is_listed_by_clean_help(halfclip, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["clean", "--help"])
    assert exit.value.code == 0
    assert "halfclip" in " ".join(capsys.readouterr().out.split())  # help text wraps
    assert DEFENSES.get(halfclip).objective == "halfclip"


def test_it_runs_in_the_benchmark_and_its_table(halfclip, tmp_path, micro_cache):
    out = tmp_path / "bench"
    run_bench(micro_profile("micro-bench.yaml", micro_cache), str(out), quick=True, defenses=[halfclip],
              progress=False)
    rows = list(csv.DictReader((out / "results.csv").open()))
    mine = [r for r in rows if r["defense"] == halfclip]
    assert [r["status"] for r in mine] == ["ok"] and 0 <= float(mine[0]["asr"]) <= 1
    (config,) = out.glob(f"cleaned-*-{halfclip}-*/config.yaml")
    assert f"objective: {halfclip}" in config.read_text()  # the cell trained with the new objective
    assert not any(r["defense"].endswith("-synthetic") for r in rows)  # the --defenses choice narrows that column
    assert f"{halfclip} CA | {halfclip} ASR" in (out / "results.md").read_text()


def test_a_second_registration_under_the_same_name_is_an_error(halfclip):
    with pytest.raises(ParError, match="already registered"):
        @defense("halfclip")
        class Again(Objective):
            pass
