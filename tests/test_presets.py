"""`eval zeroshot --preset`: the CLIP paper's class names and templates, checked against the class
folders, and the same classifier over an ImageFolder and over labelled shards."""

import json
import re
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from multimodal.errors import UserError
from multimodal.eval import zeroshot
from multimodal.eval.presets import CIFAR10, CIFAR100, PRESETS, check_class_folders


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
    assert counts == {"imagenet1k": (1000, 80), "cifar10": (10, 18), "cifar100": (100, 18)}
    for build in PRESETS.values():
        preset = build()
        assert all(t.count("{}") == 1 and "{c}" not in t for t in preset.templates), preset.name
    assert CIFAR10.classnames[:3] == ("airplane", "automobile", "bird")
    assert {"aquarium fish", "maple tree", "sweet pepper"} <= set(CIFAR100.classnames)
    assert CIFAR100.classnames == tuple(sorted(CIFAR100.classnames))  # CIFAR's label order: alphabetical
    imagenet = PRESETS["imagenet1k"]()
    assert imagenet.classnames[:2] == ("tench", "goldfish") and imagenet.templates[0] == "a bad photo of a {}."


def test_the_presets_are_clip_benchmarks():
    """The templates (all three) and the ImageNet class names equal CLIP_benchmark's own lists; its CIFAR
    class names come from the dataset files, so they are not in its package."""
    pytest.importorskip("clip_benchmark")
    from importlib.resources import files

    datasets = files("clip_benchmark") / "datasets"
    templates = json.loads((datasets / "en_zeroshot_classification_templates.json").read_text())
    classnames = json.loads((datasets / "en_classnames.json").read_text())
    for name, build in PRESETS.items():
        assert list(build().templates) == [t.replace("{c}", "{}") for t in templates[name]], name
    assert list(PRESETS["imagenet1k"]().classnames) == classnames["imagenet1k"]


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
