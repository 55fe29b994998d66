"""Zero-shot presets: the class names and prompt templates of the CLIP paper, so that `eval zeroshot
--preset NAME` scores compare with CLIP_benchmark's (Radford et al. 2021, https://arxiv.org/abs/2103.00020).

Sources, not copies where a library ships them:
- imagenet1k: open_clip's `zero_shot_metadata` (`IMAGENET_CLASSNAMES`, `OPENAI_IMAGENET_TEMPLATES`): the
  same 1000 names and 80 templates as CLIP_benchmark's `en_classnames.json` and
  `en_zeroshot_classification_templates.json` (`tests/test_presets.py` compares them where it is installed).
- cifar10, cifar100: the class names of CLIP's https://github.com/openai/CLIP/blob/main/data/prompts.md
  (CIFAR-100's with spaces: "aquarium fish"); the 18 templates of CLIP_benchmark's
  clip_benchmark/datasets/en_zeroshot_classification_templates.json (the same list for both, the CLIP
  notebook's), written with `{}` for its `{c}`.

Light: importing this module imports neither torch nor open_clip (the CLI names the presets before it
imports them); building the imagenet1k preset imports open_clip.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from multimodal.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    classnames: tuple[str, ...]  # in label order
    templates: tuple[str, ...]  # "{}" stands for the class name


CLIP_CIFAR_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

CIFAR10 = Preset("cifar10", (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
), CLIP_CIFAR_TEMPLATES)

CIFAR100 = Preset("cifar100", (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf", "woman", "worm",
), CLIP_CIFAR_TEMPLATES)


def imagenet1k() -> Preset:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    # open_clip's templates are callables (lambda c: f"a photo of a {c}."); the classifier formats "{}" strings
    return Preset("imagenet1k", tuple(IMAGENET_CLASSNAMES), tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES))


PRESETS: dict[str, Callable[[], Preset]] = {  # called when used: imagenet1k imports open_clip, and torch with it
    "imagenet1k": imagenet1k,
    "cifar10": lambda: CIFAR10,
    "cifar100": lambda: CIFAR100,
}

# A class folder named by an id, not a name: a WordNet id (ImageNet's n01440764) or an index (CIFAR's 0..99)
_CLASS_ID = re.compile(r"n\d{8}|\d+")


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def check_class_folders(preset: Preset, folders: list[str], root: Path) -> None:
    """Refuse an ImageFolder whose class `folders` (sorted: label order) cannot be the preset's classes:
    another number of them; folders named by index whose sorted order is not their index order (10
    before 2); folders named by class whose names, lowercased and with "_" and "-" as spaces, are not
    the preset's in label order."""
    count = len(preset.classnames)
    if len(folders) != count:
        raise UserError(f"{root} has {len(folders)} class folders but preset {preset.name} has {count} classes: "
                        f"pass a folder with one sub-folder per class of {preset.name}.")
    if all(_CLASS_ID.fullmatch(f) for f in folders):
        width = len(str(count - 1))
        wrong = next((label for label, f in enumerate(folders) if f.isdigit() and int(f) != label), None)
        if wrong is not None:
            raise UserError(f"Class folder {root / folders[wrong]} sorts as label {wrong}, not the class its "
                            f"name says: name them by class index from 0, padded with zeros ({0:0{width}d}, "
                            f"{1:0{width}d}, ..., {count - 1}), so that their sorted order is the class order.")
        return
    for label, (folder, name) in enumerate(zip(folders, preset.classnames)):
        if _normalise(folder) != _normalise(name):
            raise UserError(f"Class folder {root / folder} (label {label} in sorted order) is not class '{name}' "
                            f"of preset {preset.name}: name the class folders as its classes or by class index.")
