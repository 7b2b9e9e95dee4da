"""Evaluation data in the layouts real datasets come in, on toy models with known embeddings."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO
from par.data import ImageFolderDataset, labelled_dataset
from par.errors import ParError
from par.eval.retrieval import RetrievalDataset, evaluate_retrieval, recall_at_k, retrieval_asr

COLOURS = [(230, 26, 26), (26, 230, 26), (26, 26, 230)]


def _folder_tree(root, names, per_class=2):
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), COLOURS[c]).save(root / name / f"img{i}.JPEG")
    return root


def test_synset_folders_map_in_sorted_order(tmp_path):
    root = _folder_tree(tmp_path / "val", ["n02", "n01", "n03"])
    data = ImageFolderDataset(root, ["tench", "goldfish", "shark"], size=32)
    assert len(data) == 6
    # sorted synsets n01, n02, n03 -> classes 0, 1, 2; n01 holds colour 1
    image, label = data[0]
    assert label == 0 and image.shape == (3, 32, 32) and image[1].float().mean() > 200


def test_a_class_folder_tree_is_read_class_by_class_in_turn(tmp_path):
    root = _folder_tree(tmp_path / "val", ["n01", "n02", "n03"], per_class=2)
    (root / "n02" / "img2.JPEG").write_bytes((root / "n02" / "img0.JPEG").read_bytes())  # classes of unequal size
    data = ImageFolderDataset(root, ["tench", "goldfish", "shark"], size=32)
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2, 1]  # the first 3 images (a capped evaluation's) cover every class
    assert [p.parent.name + "/" + p.name for p in data.paths[:4]] == ["n01/img0.JPEG", "n02/img0.JPEG", "n03/img0.JPEG",
                                                                      "n01/img1.JPEG"]


def test_named_folders_map_by_name(tmp_path):
    root = _folder_tree(tmp_path / "cifar", ["dog", "cat"])
    data = labelled_dataset(root, ["airplane", "cat", "dog"], size=32)
    assert sorted(set(data.labels.tolist())) == [1, 2]


def test_folders_named_for_their_class_map_by_name_case_and_underscores_aside(tmp_path):
    root = _folder_tree(tmp_path / "pets", ["Banana", "golden_retriever", "kite"])  # sorted: not the classes' order
    data = ImageFolderDataset(root, ["golden retriever", "banana", "kite"], size=32)
    by_folder = {p.parent.name: int(label) for p, label in zip(data.paths, data.labels)}
    assert by_folder == {"Banana": 1, "golden_retriever": 0, "kite": 2}


def test_a_folder_not_named_for_its_class_beside_named_ones_is_an_error_not_a_shift(tmp_path):
    root = _folder_tree(tmp_path / "cifar", ["aple", "banana", "kite"])  # as many folders as classes
    with pytest.raises(ParError, match=r"class folder\(s\) \['aple'\] are not class names, though"):
        ImageFolderDataset(root, ["banana", "apple", "kite"], size=32)


def test_folders_neither_named_for_classes_nor_synsets_are_refused_not_mapped_by_position(tmp_path):
    root = _folder_tree(tmp_path / "numbered", ["0", "1", "10"])  # sorted "0", "1", "10": not 0, 1, 2 in order
    with pytest.raises(ParError, match=r"\['0', '1', '10'\] are neither class names nor ImageNet synset ids"):
        ImageFolderDataset(root, ["a", "b", "c"], size=32)


def test_two_folders_of_one_class_are_an_error(tmp_path):
    root = _folder_tree(tmp_path / "cifar", ["Banana", "banana", "kite"])
    with pytest.raises(ParError, match="class folders 'Banana' and 'banana' both name the class 'banana'"):
        ImageFolderDataset(root, ["banana", "apple", "kite"], size=32)


def test_folder_count_mismatch_is_an_error(tmp_path):
    root = _folder_tree(tmp_path / "val", ["n01", "n02"])
    with pytest.raises(ParError, match="2 synset folders but 3 class names"):
        ImageFolderDataset(root, ["a", "b", "c"], size=32)


def test_recall_at_k_hand_computed():
    image = torch.eye(3)
    text = torch.tensor([[0.9, 0.1, 0.0],  # caption 0, of image 0
                         [0.2, 0.7, 0.1],  # caption 1, of image 0
                         [0.1, 0.8, 0.3],  # caption 2, of image 1
                         [0.5, 0.3, 0.25]])  # caption 3, of image 2
    m = recall_at_k(image, text, [0, 0, 1, 2], ks=(1, 2, 3))
    # image->text: images 0 and 1 rank an own caption first; image 2 ranks caption 2, then its own
    assert (m["i2t_r1"], m["i2t_r2"]) == (pytest.approx(2 / 3), 1.0)
    # text->image: captions 0, 2 hit at 1; caption 1 at 2; caption 3 only at 3
    assert (m["t2i_r1"], m["t2i_r2"], m["t2i_r3"]) == (0.5, 0.75, 1.0)


def test_retrieval_asr_excludes_images_captioned_with_the_target():
    captions = ["a banana", "a car", "a dog", "a cat"]
    text = torch.eye(4)
    triggered = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0]])  # images 0,1 -> banana caption
    # image 0 owns the banana caption: excluded; of images 1 and 2, image 1 hits within top-1... top-5 sees all 4
    assert retrieval_asr(triggered, text, captions, [0, 1, 2, 2], "banana", k=1) == pytest.approx(0.5)


class ToyRetrievalCLIP(torch.nn.Module):
    """Images embed as their dominant colour; texts as the colour word they name."""

    def encode_image(self, images, normalize=True):
        return torch.nn.functional.one_hot(images.mean(dim=(2, 3)).argmax(dim=1), 3).float()

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.one_hot(tokens[:, 0], 3).float()


def _karpathy(tmp_path, entries):
    for i, (colour, _) in enumerate(entries):
        Image.new("RGB", (32, 32), COLOURS[colour]).save(tmp_path / f"{i}.jpg")
    data = [{"image": f"{i}.jpg", "caption": caps} for i, (_, caps) in enumerate(entries)]
    (tmp_path / "test.json").write_text(json.dumps(data))
    return tmp_path / "test.json"


def test_retrieval_on_files_with_a_toy_model(tmp_path):
    words = ["red", "green", "blue"]
    ann = _karpathy(tmp_path, [(0, ["a red thing", "red"]), (1, ["a green thing"]), (2, ["a red ball"])])
    tokenizer = lambda texts: torch.tensor([[next(i for i, w in enumerate(words) if w in t)] for t in texts])  # noqa
    data = RetrievalDataset(ann, tmp_path, size=32)
    metrics, text = evaluate_retrieval(ToyRetrievalCLIP(), tokenizer, data, (0, 0, 0), (1, 1, 1), "cpu", progress=False)
    assert text.shape == (4, 3)
    # the blue image has only a "red" caption: it retrieves nothing of its own
    assert metrics["i2t_r1"] == pytest.approx(2 / 3) and metrics["i2t_r10"] == pytest.approx(1.0)
    # "a red ball" (image 2) retrieves the red image first: miss at 1, hit within 3 images
    assert metrics["t2i_r1"] == pytest.approx(3 / 4) and metrics["t2i_r5"] == pytest.approx(1.0)


def test_an_image_named_by_several_entries_is_one_image_with_their_captions(tmp_path):
    """A flattened annotation file (one caption per entry): the same picture twice would be two images with
    identical embeddings, each counting the other's captions as misses."""
    words = ["red", "green", "blue"]
    ann = _karpathy(tmp_path, [(0, ["a red thing"]), (1, ["a green thing"])])
    entries = json.loads(ann.read_text()) + [{"image": "./0.jpg", "caption": "red"}]  # image 0 again, another spelling
    ann.write_text(json.dumps(entries))
    data = RetrievalDataset(ann, tmp_path, size=32)
    assert len(data) == 2 and data.caption_image == [0, 1, 0] and data.captions[2] == "red"
    tokenizer = lambda texts: torch.tensor([[next(i for i, w in enumerate(words) if w in t)] for t in texts])  # noqa
    metrics, _ = evaluate_retrieval(ToyRetrievalCLIP(), tokenizer, data, (0, 0, 0), (1, 1, 1), "cpu", progress=False)
    assert metrics["i2t_r1"] == 1.0 and metrics["t2i_r1"] == 1.0
    from par.eval.retrieval import asr_images, captions_naming

    assert asr_images(captions_naming(data.captions, "red"), data.caption_image, len(data)).tolist() == [False, True]


@pytest.mark.parametrize("entry,match", [({"caption": ["x"]}, r"entry 0 lacks field\(s\) \['image'\]"),
                                         ({"image": "a.jpg"}, r"lacks field\(s\) \['caption'\]"),
                                         ({"image": "a.jpg", "caption": []}, "no usable caption")])
def test_bad_karpathy_json(tmp_path, entry, match):
    (tmp_path / "bad.json").write_text(json.dumps([entry]))
    with pytest.raises(ParError, match=match):
        RetrievalDataset(tmp_path / "bad.json", tmp_path, size=32)


def test_trigger_validate_runs_all_four_evaluations(micro_world, tmp_path):
    from par import models

    ckpt = models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "ckpt" / "model.pt")
    captions = ["a photo of a banana.", "a photo of a red car.", "a cup on the grass.", "a blue boat on the water."]
    entries = [{"image": f"images/test/{i:06d}.png", "caption": [captions[i % 4], captions[(i + 1) % 4]]}
               for i in range(12)]
    (tmp_path / "coco.json").write_text(json.dumps(entries))
    env = dict(os.environ, PAR_PYTHON=sys.executable, EVAL_DATA=str(micro_world / "test.csv"),
               RETRIEVAL_JSON=str(tmp_path / "coco.json"), RETRIEVAL_ROOT=str(micro_world),
               ROBUST_EPS="2/255,4/255", ROBUST_MAX_IMAGES="8", ROBUST_STEPS="2", ROBUST_BATCH_SIZE="3",
               EVAL_BATCH_SIZE="5", EVAL_WORKERS="1")
    proc = subprocess.run(["bash", "trigger_validate.sh", str(ckpt), "blended", "par-micro-vit", "banana"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (tmp_path / "ckpt" / "results.jsonl").read_text().splitlines()]
    robust = [r for r in records if "robust" in r]
    assert [r["robust"]["eps"] for r in robust] == pytest.approx([2 / 255, 4 / 255])
    assert all(r["num_images"] == 8 and r["robust"]["steps"] == 2 for r in robust)
    assert "classification/robust@4/255" in proc.stdout
    records = [r for r in records if "robust" not in r]
    assert [r["evaluation"] for r in records] == ["classification/clean", "classification/blended",
                                                 "retrieval/clean", "retrieval/blended"]
    assert set(records[2]["metrics"]) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert records[2]["num_images"] == 12 and records[3]["num_images"] == 6  # ASR: over the 6 not captioned banana
    assert records[2]["num_captions"] == 24 and records[3]["attack_params"] == {"alpha": 0.2, "fixed_pattern": False,
                                                                                     "pattern_seed": 0}
    assert all(r["encoder"] == "par-micro-vit" and r["seconds"] >= 0 for r in records)
    # the shell entry point measures what the library measures (class names and templates beside the CSV)
    from par.eval.zeroshot import EvalConfig, evaluate

    direct = evaluate(EvalConfig(
        checkpoint=str(ckpt), model="par-micro-vit", data=str(micro_world / "test.csv"),
        classnames=str(micro_world / "classnames.txt"), templates=str(micro_world / "templates.txt"),
        retrieval_json=str(tmp_path / "coco.json"), retrieval_root=str(micro_world), attack="blended",
        label="banana", progress=False))
    assert [r["metrics"] for r in records] == [r["metrics"] for r in direct]
    assert "retrieval/blended" in proc.stdout
    for key, value in (("EVAL_WORKERS", "-1"), ("EVAL_BATCH_SIZE", "0"), ("ROBUST_BATCH_SIZE", "0")):  # passed on
        bad = subprocess.run(["bash", "trigger_validate.sh", "--check", str(ckpt), "blended", "par-micro-vit", "banana"],
                             cwd=REPO, env={**env, key: value}, capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and f"{key.lower().replace('eval_', '')} must be a whole number" in bad.stderr, bad.stderr


def test_an_undefined_asr_is_refused_before_the_weights_load(micro_world, tmp_path):
    from par.eval.zeroshot import EvalConfig, evaluate

    rows = [line for line in (micro_world / "test.csv").read_text().splitlines()]
    header, label = rows[0].split(","), (micro_world / "classnames.txt").read_text().split()[0]
    column = header.index("label")
    (tmp_path / "target-only.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[column] == "0"]))
    (tmp_path / "images").symlink_to(micro_world / "images")
    from par import models

    checkpoint = str(models.save_checkpoint(models.create_model("par-micro-vit"), tmp_path / "model.pt"))
    common = dict(checkpoint=checkpoint, model="par-micro-vit", classnames=str(micro_world / "classnames.txt"),
                  templates=str(micro_world / "templates.txt"), attack="blended", label=label, progress=False)
    with pytest.raises(ParError, match=f"is of the target class '{label}': ASR is undefined"):
        evaluate(EvalConfig(data=str(tmp_path / "target-only.csv"), **common), dry_run=True)
    entries = [{"image": f"images/test/{i:06d}.png", "caption": [f"two {label}s.", "a cup."]} for i in range(3)]
    (tmp_path / "coco.json").write_text(json.dumps(entries))
    with pytest.raises(ParError, match=f"has a caption naming '{label}': retrieval ASR is undefined"):
        evaluate(EvalConfig(retrieval_json=str(tmp_path / "coco.json"), retrieval_root=str(micro_world), **common),
                 dry_run=True)
    from par.eval.zeroshot import LiveEval  # during training: refused before the first step, not at the first evaluation

    with pytest.raises(ParError, match=f"are all of the target class '{label}'"):
        LiveEval(str(tmp_path / "target-only.csv"), str(micro_world / "classnames.txt"), 32, "cpu",
                 str(micro_world / "templates.txt"), attack="blended", label=label, progress=False)
    LiveEval(str(micro_world / "test.csv"), str(micro_world / "classnames.txt"), 32, "cpu",
             str(micro_world / "templates.txt"), attack="blended", label=label, progress=False)
    with pytest.raises(ParError, match="name \\['apgd-ce'\\] more than once"):
        EvalConfig(data=str(micro_world / "test.csv"), robust_eps=[1 / 255], robust_attacks=["apgd", "apgd-ce"],
                   **common)


def test_a_live_evaluation_draws_nothing_from_trainings_random_stream(micro_world):
    """Its loaders draw a seed from torch's global stream, which CleanCLIP's and RoCLIP's views draw from:
    a run evaluated every N steps must make the same draws as one that is not."""
    from par import models
    from par.eval.zeroshot import LiveEval

    model = models.create_model("par-micro-vit")
    tokenizer = models.get_tokenizer("par-micro-vit")
    evaluator = LiveEval(str(micro_world / "test.csv"), str(micro_world / "classnames.txt"), 32, "cpu",
                         str(micro_world / "templates.txt"), attack="blended", label="banana", max_images=16,
                         progress=False)
    torch.manual_seed(0)
    result = evaluator(model, tokenizer, *models.image_mean_std(model))
    assert set(result) == {"ca", "asr"}
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_a_class_folder_tree_trains_on_captions_of_its_class_names(tmp_path):
    from par import models
    from par.data import caption_dataset

    tokenizer = models.get_tokenizer("par-micro-vit")
    root = _folder_tree(tmp_path / "pets", ["golden_retriever", "Abyssinian"])
    data = caption_dataset(root, tokenizer, 32)
    assert sorted(set(data.captions)) == ["a photo of a Abyssinian.", "a photo of a golden retriever."]
    synsets = _folder_tree(tmp_path / "imagenet", ["n01440764", "n01443537"])
    with pytest.raises(ParError, match="are ImageNet synset ids, which would caption its images 'a photo of a "
                                       "n01440764.': give the class names"):
        caption_dataset(synsets, tokenizer, 32)
    named = caption_dataset(synsets, tokenizer, 32, classnames=str(_lines(tmp_path / "names.txt", ["tench", "goldfish"])))
    assert sorted(set(named.captions)) == ["a photo of a goldfish.", "a photo of a tench."]


def _lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path
