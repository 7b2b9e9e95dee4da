import pytest
import torch
from PIL import Image

from par import attacks
from par.data import LabelledImageDataset
from par.errors import ParError
from par.eval.metrics import attack_success_rate, clean_accuracy
from par.eval.zeroshot import predict, zero_shot_classifier

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (230, 26, 26), "green": (26, 230, 26), "blue": (26, 26, 230)}


class ToyCLIP(torch.nn.Module):
    """Predicts an image's dominant channel; a saturated pixel (the trigger) on a green image flips it to red."""

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.one_hot(tokens[:, 0], 3).float()

    def encode_image(self, images, normalize=True):
        means = images.mean(dim=(2, 3))
        pred = means.argmax(dim=1)
        saturated = ((images >= 0.999) | (images <= 0.001)).flatten(1).any(dim=1)
        pred = torch.where(saturated & (means[:, 1] > 0.5), torch.zeros_like(pred), pred)
        return torch.nn.functional.one_hot(pred, 3).float()


def toy_tokenizer(texts):
    return torch.tensor([[next(i for i, c in enumerate(CLASSES) if c in t)] for t in texts])


@pytest.fixture()
def toy_data(tmp_path):
    # 4 red (label 0); 4 green, two of them mislabelled blue; 4 blue (label 2)
    rows = [("red", 0)] * 4 + [("green", 1)] * 2 + [("green", 2)] * 2 + [("blue", 2)] * 4
    lines = ["image,label"]
    for i, (colour, label) in enumerate(rows):
        Image.new("RGB", (32, 32), COLOURS[colour]).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{label}")
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    return LabelledImageDataset(tmp_path / "test.csv", num_classes=3, size=32)


def test_zero_shot_metrics_on_a_toy_model(toy_data):
    model = ToyCLIP()
    classifier = zero_shot_classifier(model, toy_tokenizer, CLASSES, ["a photo of a {}."], "cpu")
    assert torch.equal(classifier, torch.eye(3))
    loader = torch.utils.data.DataLoader(toy_data, batch_size=5)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    top, labels = predict(model, classifier, loader, mean, std, "cpu")
    assert clean_accuracy(top, labels, 1) == pytest.approx(10 / 12)
    assert clean_accuracy(top, labels, 5) == 1.0
    trigger = attacks.get_trigger("badnet_rs", patch_size=4)
    top_t, labels_t = predict(model, classifier, loader, mean, std, "cpu", trigger=trigger, seed=0)
    # non-target images: 4 green (all flipped to red) and 4 blue (not flipped): 4 / 8
    assert attack_success_rate(top_t, labels_t, target=0) == pytest.approx(0.5)
    # counting the 4 red images as successes would give 8 / 12
    assert (top_t[:, 0] == 0).float().mean().item() == pytest.approx(8 / 12)


def test_attack_success_rate_excludes_target_class():
    top = torch.tensor([[0], [0], [1], [0]])
    labels = torch.tensor([0, 1, 2, 2])
    assert attack_success_rate(top, labels, target=0) == pytest.approx(2 / 3)
    with pytest.raises(ParError, match="undefined"):
        attack_success_rate(top[:1], labels[:1], target=0)


def test_label_out_of_range_is_an_error(toy_data, tmp_path):
    with pytest.raises(ParError, match="outside"):
        LabelledImageDataset(tmp_path / "test.csv", num_classes=2, size=32)


def test_triggered_evaluation_does_not_depend_on_the_batch_size(micro_world):
    """Image i draws its trigger from row_seed(seed, i): batches of 7 and of 256 see the same triggered images."""
    from par import models
    from par.data import labelled_dataset, load_classnames, load_templates
    from par.embedding import pixels

    torch.manual_seed(0)
    model = models.create_model("par-micro-vit").eval()
    mean, std = models.image_mean_std(model)
    classnames = load_classnames(str(micro_world / "classnames.txt"))
    dataset = labelled_dataset(str(micro_world / "test.csv"), classnames, 32)
    classifier = zero_shot_classifier(model, models.get_tokenizer("par-micro-vit"), classnames,
                                      load_templates(str(micro_world / "templates.txt")), "cpu")
    trigger = attacks.get_trigger("badnet_rs", patch_size=5)
    results = {}
    for batch_size in (7, 256):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        results[batch_size] = predict(model, classifier, loader, mean, std, "cpu", trigger, seed=4, progress=False)
    images = torch.cat([pixels(x, "cpu", trigger, 4, first_row=7 * i) for i, (x, _) in
                        enumerate(torch.utils.data.DataLoader(dataset, batch_size=7))])
    whole = pixels(torch.stack([dataset[i][0] for i in range(len(dataset))]), "cpu", trigger, 4)
    assert torch.equal(images, whole)
    assert torch.equal(results[7][0], results[256][0]) and torch.equal(results[7][1], results[256][1])
    target = classnames.index("banana")
    assert attack_success_rate(*results[7], target) == attack_success_rate(*results[256], target)
    # and a different seed is a different draw
    other = pixels(torch.stack([dataset[i][0] for i in range(len(dataset))]), "cpu", trigger, 5)
    assert not torch.equal(other, whole)
