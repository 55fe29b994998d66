"""`eval zeroshot --preset`: the CLIP paper's class names and templates, checked against the class
folders, and the same classifier over an ImageFolder and over labelled shards."""

import ast
import json
import re
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from multimodal.errors import UserError
from multimodal.eval import zeroshot
from multimodal.eval.presets import (
    CIFAR10,
    CIFAR100,
    IMAGENET_A_CLASSES,
    IMAGENET_R_CLASSES,
    OBJECTNET_FOLDERS,
    PRESETS,
    check_class_folders,
)

# ObjectNet 1.0's mappings/folder_to_objectnet_label.json (as github.com/mlfoundations/wise-ft copies it, whose
# loader CLIP_benchmark's datasets/objectnet.py adapts), the entries of the 113 keys of its
# mappings/objectnet_to_imagenet_1k.json, in that file's order, and two of the 200 classes outside ImageNet
OBJECTNET_LABELS = {
    "alarm_clock": "Alarm clock", "backpack": "Backpack", "banana": "Banana", "band_aid": "Band Aid",
    "basket": "Basket", "full_sized_towel": "Bath towel", "beer_bottle": "Beer bottle", "bench": "Bench",
    "bicycle": "Bicycle", "binder_closed": "Binder (closed)", "bottle_cap": "Bottle cap",
    "bread_loaf": "Bread loaf", "broom": "Broom", "bucket": "Bucket", "butchers_knife": "Butcher's knife",
    "can_opener": "Can opener", "candle": "Candle", "cellphone": "Cellphone", "chair": "Chair",
    "clothes_hamper": "Clothes hamper", "coffee_french_press": "Coffee/French press",
    "combination_lock": "Combination lock", "computer_mouse": "Computer mouse", "desk_lamp": "Desk lamp",
    "hand_towel_or_rag": "Dishrag or hand towel", "doormat": "Doormat", "dress_shoe_men": "Dress shoe (men)",
    "drill": "Drill", "drinking_cup": "Drinking Cup", "drying_rack_for_dishes": "Drying rack for plates",
    "envelope": "Envelope", "fan": "Fan", "frying_pan": "Frying pan", "dress": "Dress", "hair_dryer": "Hair dryer",
    "hammer": "Hammer", "helmet": "Helmet", "iron_for_clothes": "Iron (for clothes)", "jeans": "Jeans",
    "keyboard": "Keyboard", "ladle": "Ladle", "lampshade": "Lampshade", "laptop_open": "Laptop (open)",
    "lemon": "Lemon", "letter_opener": "Letter opener", "lighter": "Lighter", "lipstick": "Lipstick",
    "match": "Match", "measuring_cup": "Measuring cup", "microwave": "Microwave",
    "mixing_salad_bowl": "Mixing / Salad Bowl", "monitor": "Monitor", "mug": "Mug",
    "nail_fastener": "Nail (fastener)", "necklace": "Necklace", "orange": "Orange", "padlock": "Padlock",
    "paintbrush": "Paintbrush", "paper_towel": "Paper towel", "pen": "Pen", "pill_bottle": "Pill bottle",
    "pillow": "Pillow", "pitcher": "Pitcher", "plastic_bag": "Plastic bag", "plate": "Plate", "plunger": "Plunger",
    "pop_can": "Pop can", "portable_heater": "Portable heater", "printer": "Printer",
    "remote_control": "Remote control", "ruler": "Ruler", "running_shoe": "Running shoe",
    "safety_pin": "Safety pin", "salt_shaker": "Salt shaker", "sandal": "Sandal", "screw": "Screw",
    "shovel": "Shovel", "skirt": "Skirt", "sleeping_bag": "Sleeping bag", "soap_dispenser": "Soap dispenser",
    "sock": "Sock", "soup_bowl": "Soup Bowl", "spatula": "Spatula", "speaker": "Speaker",
    "still_camera": "Still Camera", "strainer": "Strainer", "stuffed_animal": "Stuffed animal",
    "suit_jacket": "Suit jacket", "sunglasses": "Sunglasses", "sweater": "Sweater",
    "swimming_trunks": "Swimming trunks", "t-shirt": "T-shirt", "tv": "TV", "teapot": "Teapot",
    "tennis_racket": "Tennis racket", "tie": "Tie", "toaster": "Toaster", "toilet_paper_roll": "Toilet paper roll",
    "trash_bin": "Trash bin", "tray": "Tray", "umbrella": "Umbrella", "vacuum_cleaner": "Vacuum cleaner",
    "vase": "Vase", "wallet": "Wallet", "watch": "Watch", "water_bottle": "Water bottle",
    "weight_exercise": "Weight (exercise)", "weight_scale": "Weight scale", "wheel": "Wheel", "whistle": "Whistle",
    "wine_bottle": "Wine bottle", "winter_glove": "Winter glove", "wok": "Wok",
}
OBJECTNET_OTHERS = {"squeegee": "Squeegee", "tanktop": "Tanktop"}  # ObjectNet classes ImageNet does not have


def image_folder(root: Path, names: list[str], per_class: int = 2) -> Path:
    """One folder a class, `per_class` small solid-colour JPEGs in each."""
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = (25 * label % 256, 90 * i % 256, 255 - 25 * label % 256)
            Image.new("RGB", (24 + 4 * i, 24), colour).save(root / name / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny architecture with random weights, as an open_clip state dict (pass --model tiny)."""
    from multimodal import arch, weights
    from multimodal.model import create_model

    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    weights.export(create_model(arch.load("tiny")), path)
    return path


def test_each_preset_holds_its_classes_and_templates():
    counts = {name: (len(p.classnames), len(p.templates)) for name, p in ((n, f()) for n, f in PRESETS.items())}
    assert counts == {"imagenet1k": (1000, 80), "imagenetv2": (1000, 80), "imagenet_sketch": (1000, 80),
                      "imagenet-a": (200, 80), "imagenet-r": (200, 80), "objectnet": (113, 80),
                      "cifar10": (10, 18), "cifar100": (100, 18)}
    assert all(name == build().name for name, build in PRESETS.items())
    for build in PRESETS.values():
        preset = build()
        assert all(t.count("{}") == 1 and "{c}" not in t for t in preset.templates), preset.name
    assert CIFAR10.classnames[:3] == ("airplane", "automobile", "bird")
    assert {"aquarium fish", "maple tree", "sweet pepper"} <= set(CIFAR100.classnames)
    assert CIFAR100.classnames == tuple(sorted(CIFAR100.classnames))  # CIFAR's label order: alphabetical
    imagenet = PRESETS["imagenet1k"]()
    assert imagenet.classnames[:2] == ("tench", "goldfish") and imagenet.templates[0] == "a bad photo of a {}."
    assert PRESETS["imagenet-a"]().classnames[:2] == ("stingray", "goldfinch")
    assert PRESETS["imagenet-r"]().classnames[:2] == ("goldfish", "great white shark")
    assert PRESETS["objectnet"]().classnames[32:36] == ("bath towel", "hair dryer", "hammer", "dishrag or hand towel")


def clip_benchmark_file(name: str) -> str:
    pytest.importorskip("clip_benchmark")
    from importlib.resources import files

    return (files("clip_benchmark") / "datasets" / name).read_text()


def builder_branch(dataset: str) -> tuple[str, dict[str, list]]:
    """The source of the `dataset_name == dataset` branch of CLIP_benchmark's `build_dataset`, and the
    literal lists it and the module assign, read from its source: its ImageNet-A/-R WordNet ids are locals of
    `build_dataset`, and importing it needs packages this project does not (requests)."""
    source = clip_benchmark_file("builder.py")
    tree = ast.parse(source)
    branch = next(node for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                  and isinstance(node.test.comparators[0], ast.Constant) and node.test.comparators[0].value == dataset)
    lists = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
             and node.targets[0].id.endswith(("_wnids", "_wordnet_ids"))}
    return "\n".join(ast.get_source_segment(source, statement) for statement in branch.body), lists


def test_the_presets_are_clip_benchmarks():
    """The templates (all of them) and the ImageNet class names equal CLIP_benchmark's own lists: a dataset
    its templates file does not name gets imagenet1k's; its CIFAR class names come from the dataset files,
    so they are not in its package."""
    templates = json.loads(clip_benchmark_file("en_zeroshot_classification_templates.json"))
    classnames = json.loads(clip_benchmark_file("en_classnames.json"))
    for name, build in PRESETS.items():
        expected = templates.get(name, templates["imagenet1k"])  # builder.py's default_dataset_for_templates
        assert list(build().templates) == [t.replace("{c}", "{}") for t in expected], name
    for name in ("imagenet1k", "imagenetv2", "imagenet_sketch"):
        assert list(PRESETS[name]().classnames) == classnames["imagenet1k"], name
        assert 'ds.classes = default_classnames["imagenet1k"]' in builder_branch(name)[0], name


@pytest.mark.parametrize("name, wnids, classes", [
    ("imagenet-a", "imagenet_a_wnids", IMAGENET_A_CLASSES),
    ("imagenet-r", "imagenet_r_wnids", IMAGENET_R_CLASSES),
])
def test_imagenet_a_and_r_are_clip_benchmarks_mask_of_imagenet(name, wnids, classes):
    """builder.py keeps the ImageNet class names whose WordNet id is in the dataset's list, in ImageNet order."""
    branch, lists = builder_branch(name)
    assert "for wnid in all_imagenet_wordnet_ids" in branch and wnids in branch
    assert 'ds.classes = default_classnames["imagenet1k"]' in branch
    subset = set(lists[wnids])
    mask = [wnid in subset for wnid in lists["all_imagenet_wordnet_ids"]]
    imagenet = json.loads(clip_benchmark_file("en_classnames.json"))["imagenet1k"]
    assert len(subset) == 200 and list(classes) == [i for i, keep in enumerate(mask) if keep]
    assert list(PRESETS[name]().classnames) == [c for c, keep in zip(imagenet, mask) if keep]


def test_objectnet_is_clip_benchmarks_reading_of_its_mappings(tmp_path):
    """CLIP_benchmark's ObjectNetDataset over a stand-in for ObjectNet (its mappings, one empty file a class
    folder): its class names and the folder each label stands for are the preset's."""
    pytest.importorskip("clip_benchmark")
    from clip_benchmark.datasets.objectnet import ObjectNetDataset

    # the ImageNet ids only say which classes ObjectNet shares with ImageNet (the keys), not their order
    (tmp_path / "objectnet_to_imagenet_1k.json").write_text(json.dumps({
        label: f"imagenet class {i}" for i, label in enumerate(OBJECTNET_LABELS.values())}))
    (tmp_path / "imagenet_to_label_2012_v2").write_text("".join(f"imagenet class {i}\n" for i in range(113)))
    (tmp_path / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps({str(i): i for i in range(113)}))
    (tmp_path / "folder_to_objectnet_label.json").write_text(json.dumps({**OBJECTNET_LABELS, **OBJECTNET_OTHERS}))
    for folder in [*OBJECTNET_LABELS, *OBJECTNET_OTHERS]:
        (tmp_path / "objectnet-1.0" / "images" / folder).mkdir(parents=True)
        (tmp_path / "objectnet-1.0" / "images" / folder / "0.png").touch()

    dataset = ObjectNetDataset(root=str(tmp_path), transform=None)
    preset = PRESETS["objectnet"]()
    assert dataset.classes == list(preset.classnames)
    assert sorted(dataset.label_map, key=dataset.label_map.get) == list(preset.folders) == list(OBJECTNET_FOLDERS)
    assert sorted({Path(path).parent.name for path, _ in dataset.samples}) == list(preset.folders)  # others left out


def test_objectnet_folders_or_labels_fit_and_imagenetv2s_unpadded_folders_do_not():
    objectnet = PRESETS["objectnet"]()
    check_class_folders(objectnet, list(OBJECTNET_FOLDERS), Path("objectnet"))
    check_class_folders(objectnet, [f"{i:03d}" for i in range(113)], Path("objectnet"))
    renamed = [folder.replace("full_sized_towel", "bath_towel") for folder in OBJECTNET_FOLDERS]
    with pytest.raises(UserError, match=re.escape("bath_towel (label 5 in sorted order) is not class 'beer bottle'")):
        check_class_folders(objectnet, sorted(renamed), Path("objectnet"))  # one renamed folder moves the labels
    with pytest.raises(UserError, match="has 115 class folders but preset objectnet has 113"):
        check_class_folders(objectnet, sorted([*OBJECTNET_FOLDERS, *OBJECTNET_OTHERS]), Path("objectnet"))
    with pytest.raises(UserError, match="10 sorts as label 2"):  # ImageNetV2's folders are 0..999, labels int(name)
        check_class_folders(PRESETS["imagenetv2"](), sorted(str(i) for i in range(1000)), Path("imagenetv2"))


@pytest.mark.parametrize("folders", [
    list(CIFAR10.classnames),
    [name.upper() for name in CIFAR10.classnames],
    [str(i) for i in range(10)],
    [f"n{i:08d}" for i in range(10)],
])
def test_class_folders_that_fit_a_preset(folders):
    check_class_folders(CIFAR10, folders, Path("cifar"))


def test_cifar100_folders_spelt_with_underscores_or_hyphens_or_numbered_with_zeros_fit():
    folders = [name.replace(" ", "_") for name in CIFAR100.classnames]  # as torchvision names them
    folders[41] = "lawn-mower"
    check_class_folders(CIFAR100, folders, Path("cifar100"))
    check_class_folders(CIFAR100, [f"{i:02d}" for i in range(100)], Path("cifar100"))


@pytest.mark.parametrize("folders, says", [
    (list(CIFAR10.classnames[:9]), "has 9 class folders but preset cifar10 has 10 classes"),
    (sorted(["plane", *CIFAR10.classnames[1:]]), "automobile (label 0 in sorted order) is not class 'airplane'"),
    (sorted([*CIFAR10.classnames[:5], "dgo", *CIFAR10.classnames[6:]]), "dgo (label 5 in sorted order)"),
    (sorted(str(i) for i in range(100)), "10 sorts as label 2"),  # 0, 1, 10, 11, ...: pad them
])
def test_class_folders_that_do_not_fit_a_preset(folders, says):
    preset = CIFAR100 if len(folders) == 100 else CIFAR10
    with pytest.raises(UserError, match=re.escape(says)):
        check_class_folders(preset, folders, Path("cifar"))


def test_zeroshot_with_a_preset_over_a_folder_and_over_shards(cli, checkpoint, tmp_path, monkeypatch):
    used = []

    def recording(model, tokenizer, classnames, templates, device="cpu"):
        used.append((classnames, templates))
        return classifier(model, tokenizer, classnames, templates, device)

    classifier = zeroshot.classifier
    monkeypatch.setattr(zeroshot, "classifier", recording)
    folder = image_folder(tmp_path / "cifar", list(CIFAR10.classnames))
    with wds.TarWriter(str(tmp_path / "cifar.tar"), encoder=False) as w:
        for label, name in enumerate(CIFAR10.classnames):
            for i in range(2):
                w.write({"__key__": f"{name}{i}", "jpg": (folder / name / f"{i}.jpg").read_bytes(),
                         "cls": str(label).encode()})
    common = ["eval", "zeroshot", "--preset", "cifar10", "--checkpoint", str(checkpoint), "--model", "tiny",
              "--num_workers", "0", "--decode", "cpu"]
    proc = cli(*common, "--images", str(folder), "--out", str(tmp_path / "a.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "of 20 images into 10 classes (18 templates)" in proc.stdout
    assert cli(*common, "--shards", str(tmp_path / "cifar.tar"), "--out", str(tmp_path / "b.json"),
               cwd=tmp_path).returncode == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["metrics"] == b["metrics"] and a["num_images"] == 20 and a["num_classes"] == 10
    assert a["dataset"] == b["dataset"] == "cifar10" and a["task"] == "zeroshot_classification"
    m = a["metrics"]
    assert 0 <= m["acc1"] <= m["acc5"] <= 1 and 0 <= m["mean_per_class_recall"] <= 1
    assert used == [(list(CIFAR10.classnames), list(CIFAR10.templates))] * 2

    (tmp_path / "templates.txt").write_text("a {} in the rain\nan old photo of a {}\n")  # replaces the preset's
    assert cli(*common, "--images", str(folder), "--templates", str(tmp_path / "templates.txt"),
               cwd=tmp_path).returncode == 0
    assert used[-1] == (list(CIFAR10.classnames), ["a {} in the rain", "an old photo of a {}"])


def test_a_folder_or_option_that_does_not_fit_the_preset_is_one_sentence(cli, checkpoint, tmp_path):
    names = list(CIFAR10.classnames)
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    cases = {
        "nine": (names[:9], [], "has 9 class folders but preset cifar10 has 10 classes"),
        "misspelt": ([*names[:5], "dgo", *names[6:]], [], "dgo (label 5 in sorted order) is not class 'dog'"),
        "both": (names, ["--classnames", str(tmp_path / "names.txt")], "Pass --preset or --classnames, not both"),
    }
    for case, (folders, extra, says) in cases.items():
        folder = image_folder(tmp_path / case, folders, per_class=1)
        proc = cli("eval", "zeroshot", "--preset", "cifar10", "--checkpoint", str(checkpoint), "--model", "tiny",
                   "--images", str(folder), *extra, cwd=tmp_path)
        assert proc.returncode == 2 and says in proc.stderr, (case, proc.stderr[-2000:])
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, case
    proc = cli("eval", "zeroshot", "--preset", "cifar1000", "--checkpoint", str(checkpoint), "--images",
               str(tmp_path / "nine"), cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'cifar1000'" in proc.stderr
