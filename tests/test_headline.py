"""The claim the toolkit exists for, on a micro model that really carries its backdoor: cleaning lowers ASR."""
from par.app import pipeline


def test_par_lowers_the_asr_of_a_poisoned_micro_model_and_keeps_its_accuracy(backdoored_micro, tmp_path):
    b = backdoored_micro
    poisoned = b.evaluate(b.poisoned.checkpoint)
    foundation = b.evaluate(b.foundation)
    assert poisoned["asr_top1"] >= 0.5 > foundation["asr_top1"] + 0.3  # the backdoor is there, and planted
    cleaned = pipeline.clean_stage(b.world, "par", b.poisoned, dict(b.profile.clean), tmp_path / "par", reuse=False)
    after = b.evaluate(cleaned)
    assert after["asr_top1"] <= poisoned["asr_top1"] - 0.15, (poisoned, after)
    assert after["clean_top1"] >= poisoned["clean_top1"] - 0.05, (poisoned, after)
