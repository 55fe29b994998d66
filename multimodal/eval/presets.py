"""Zero-shot presets: the class names and prompt templates of the CLIP paper, so that `eval zeroshot
--preset NAME` scores compare with CLIP_benchmark's (Radford et al. 2021, https://arxiv.org/abs/2103.00020).
The names are CLIP_benchmark's dataset names.

Sources, not copies where a library ships them:
- imagenet1k: open_clip's `zero_shot_metadata` (`IMAGENET_CLASSNAMES`, `OPENAI_IMAGENET_TEMPLATES`): the
  same 1000 names and 80 templates as CLIP_benchmark's `en_classnames.json` and
  `en_zeroshot_classification_templates.json` (`tests/test_presets.py` compares them where it is installed).
- imagenetv2, imagenet_sketch: imagenet1k's classes and templates, as CLIP_benchmark's
  clip_benchmark/datasets/builder.py gives them (its templates file has no entry of their own, so it
  falls back on imagenet1k's; likewise for the three below).
- imagenet-a, imagenet-r: imagenet1k's names of their 200 classes (`IMAGENET_A_CLASSES`,
  `IMAGENET_R_CLASSES`, in ImageNet order), imagenet1k's templates.
- objectnet: ObjectNet's own labels, lowercased, of the 113 classes it maps to ImageNet (Barbu et al. 2019,
  https://objectnet.dev; the `mappings/` of its download, as CLIP_benchmark's datasets/objectnet.py reads
  them), imagenet1k's templates.
- cifar10, cifar100: the class names of CLIP's https://github.com/openai/CLIP/blob/main/data/prompts.md
  (CIFAR-100's with spaces: "aquarium fish"); the 18 templates of CLIP_benchmark's
  clip_benchmark/datasets/en_zeroshot_classification_templates.json (the same list for both, the CLIP
  notebook's), written with `{}` for its `{c}`.

Light: importing this module imports neither torch nor open_clip (the CLI names the presets before it
imports them); building an ImageNet or ObjectNet preset imports open_clip.
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
    folders: tuple[str, ...] = ()  # the dataset's own class-folder names in label order, where not the class names


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


# ImageNet-A's and ImageNet-R's 200 classes as ImageNet class indices (Hendrycks et al. 2021,
# https://arxiv.org/abs/1907.07174 and https://arxiv.org/abs/2006.16241): their papers' WordNet-id lists, as
# CLIP_benchmark's builder.py masks ImageNet's 1000 classes with them. Their labels 0..199 are their sorted
# WordNet-id folders, which is ImageNet's order, so label i is ImageNet class IMAGENET_A_CLASSES[i].
IMAGENET_A_CLASSES = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105, 107,
    108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295, 298,
    301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336, 347,
    361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445,
    456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557,
    561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677,
    682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792,
    797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888,
    890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980,
    981, 984, 986, 987, 988,
)
IMAGENET_R_CLASSES = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105, 107,
    113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187, 195,
    199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267, 269,
    276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330,
    334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397,
    401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483,
    487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701,
    717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889,
    895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967,
    980, 981, 983, 988,
)

# ObjectNet's 113 ImageNet classes in CLIP_benchmark's label order: the sorted names of their folders in
# ObjectNet's images/ (the keys of its mappings/objectnet_to_imagenet_1k.json, through
# mappings/folder_to_objectnet_label.json), and each folder's ObjectNet label, lowercased.
OBJECTNET_FOLDERS = (
    "alarm_clock", "backpack", "banana", "band_aid", "basket", "beer_bottle", "bench", "bicycle", "binder_closed",
    "bottle_cap", "bread_loaf", "broom", "bucket", "butchers_knife", "can_opener", "candle", "cellphone", "chair",
    "clothes_hamper", "coffee_french_press", "combination_lock", "computer_mouse", "desk_lamp", "doormat", "dress",
    "dress_shoe_men", "drill", "drinking_cup", "drying_rack_for_dishes", "envelope", "fan", "frying_pan",
    "full_sized_towel", "hair_dryer", "hammer", "hand_towel_or_rag", "helmet", "iron_for_clothes", "jeans",
    "keyboard", "ladle", "lampshade", "laptop_open", "lemon", "letter_opener", "lighter", "lipstick", "match",
    "measuring_cup", "microwave", "mixing_salad_bowl", "monitor", "mug", "nail_fastener", "necklace", "orange",
    "padlock", "paintbrush", "paper_towel", "pen", "pill_bottle", "pillow", "pitcher", "plastic_bag", "plate",
    "plunger", "pop_can", "portable_heater", "printer", "remote_control", "ruler", "running_shoe", "safety_pin",
    "salt_shaker", "sandal", "screw", "shovel", "skirt", "sleeping_bag", "soap_dispenser", "sock", "soup_bowl",
    "spatula", "speaker", "still_camera", "strainer", "stuffed_animal", "suit_jacket", "sunglasses", "sweater",
    "swimming_trunks", "t-shirt", "teapot", "tennis_racket", "tie", "toaster", "toilet_paper_roll", "trash_bin",
    "tray", "tv", "umbrella", "vacuum_cleaner", "vase", "wallet", "watch", "water_bottle", "weight_exercise",
    "weight_scale", "wheel", "whistle", "wine_bottle", "winter_glove", "wok",
)
OBJECTNET_CLASSNAMES = (
    "alarm clock", "backpack", "banana", "band aid", "basket", "beer bottle", "bench", "bicycle", "binder (closed)",
    "bottle cap", "bread loaf", "broom", "bucket", "butcher's knife", "can opener", "candle", "cellphone", "chair",
    "clothes hamper", "coffee/french press", "combination lock", "computer mouse", "desk lamp", "doormat", "dress",
    "dress shoe (men)", "drill", "drinking cup", "drying rack for plates", "envelope", "fan", "frying pan",
    "bath towel", "hair dryer", "hammer", "dishrag or hand towel", "helmet", "iron (for clothes)", "jeans",
    "keyboard", "ladle", "lampshade", "laptop (open)", "lemon", "letter opener", "lighter", "lipstick", "match",
    "measuring cup", "microwave", "mixing / salad bowl", "monitor", "mug", "nail (fastener)", "necklace", "orange",
    "padlock", "paintbrush", "paper towel", "pen", "pill bottle", "pillow", "pitcher", "plastic bag", "plate",
    "plunger", "pop can", "portable heater", "printer", "remote control", "ruler", "running shoe", "safety pin",
    "salt shaker", "sandal", "screw", "shovel", "skirt", "sleeping bag", "soap dispenser", "sock", "soup bowl",
    "spatula", "speaker", "still camera", "strainer", "stuffed animal", "suit jacket", "sunglasses", "sweater",
    "swimming trunks", "t-shirt", "teapot", "tennis racket", "tie", "toaster", "toilet paper roll", "trash bin",
    "tray", "tv", "umbrella", "vacuum cleaner", "vase", "wallet", "watch", "water bottle", "weight (exercise)",
    "weight scale", "wheel", "whistle", "wine bottle", "winter glove", "wok",
)


def imagenet(name: str, classes: tuple[int, ...] = tuple(range(1000))) -> Preset:
    """ImageNet's names of its `classes` (indices, in label order) and its 80 templates."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return Preset(name, tuple(IMAGENET_CLASSNAMES[i] for i in classes), imagenet_templates())


def imagenet_templates() -> tuple[str, ...]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    # open_clip's templates are callables (lambda c: f"a photo of a {c}."); the classifier formats "{}" strings
    return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def objectnet() -> Preset:
    """CLIP_benchmark labels an ObjectNet image by the place of its folder among `OBJECTNET_FOLDERS`
    (alarm_clock 0, ..., wok 112), not by an ImageNet index, and leaves out the other 200 folders' images:
    shards carry these labels as `cls`, and an image folder holds just these 113 class folders, under
    ObjectNet's folder names or named by label (000 to 112)."""
    return Preset("objectnet", OBJECTNET_CLASSNAMES, imagenet_templates(), OBJECTNET_FOLDERS)


PRESETS: dict[str, Callable[[], Preset]] = {  # called when used: ImageNet's and ObjectNet's import open_clip (torch)
    "imagenet1k": lambda: imagenet("imagenet1k"),
    "imagenetv2": lambda: imagenet("imagenetv2"),
    "imagenet_sketch": lambda: imagenet("imagenet_sketch"),
    "imagenet-a": lambda: imagenet("imagenet-a", IMAGENET_A_CLASSES),
    "imagenet-r": lambda: imagenet("imagenet-r", IMAGENET_R_CLASSES),
    "objectnet": objectnet,
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
    the preset's in label order, nor the dataset's own folder names where the preset has them (ObjectNet's)."""
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
    if preset.folders and list(folders) == list(preset.folders):
        return
    for label, (folder, name) in enumerate(zip(folders, preset.classnames)):
        if _normalise(folder) != _normalise(name):
            raise UserError(f"Class folder {root / folder} (label {label} in sorted order) is not class '{name}' "
                            f"of preset {preset.name}: name the class folders as its classes or by class index.")
