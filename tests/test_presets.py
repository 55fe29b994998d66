"""Zero-shot presets: the CLIP paper's class names and templates, checked against the class folders."""

import json
import re
from pathlib import Path

import pytest

from multimodal.errors import UserError
from multimodal.eval.presets import CIFAR10, CIFAR100, PRESETS, check_class_folders


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
