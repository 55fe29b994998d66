"""Zero-shot classification: class names and prompt templates become a linear classifier.

Each class's weight is the normalised mean of the normalised text embeddings of its prompts
(CLIP, section 3.1.4). Metrics: top-1 and top-5 accuracy and the mean per-class recall
(balanced accuracy), as clip_benchmark reports them.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from multimodal.data.pipeline import expand_urls, read_labelled
from multimodal.data.pixels import EvalTransform
from multimodal.data.sources import image_files, read_image_file
from multimodal.errors import UserError, read_lines
from multimodal.model import CLIP

# The project's own short prompt set. For the standard 80 ImageNet prompts, pass them as a file.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a blurry photo of a {}.",
    "a drawing of a {}.",
    "a {} in the wild.",
    "a photo of many {}s.",
)


def read_templates(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = read_lines(path, "Templates")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise UserError(f"Template '{bad[0]}' in {path} has no {{}} for the class name.")
    return templates


@torch.no_grad()
def classifier(model: CLIP, tokenizer: Callable, classnames: list[str], templates: list[str],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(C, D) unit-norm class embeddings."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        weights.append(F.normalize(model.encode_text(tokens).float().mean(0), dim=-1))
    return torch.stack(weights)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """top1, top5 and mean per-class recall of (N, C) logits against (N,) labels."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
    top1 = top[:, 0] == labels
    recalls = [top1[labels == c].float().mean() for c in range(num_classes) if (labels == c).any()]
    return {
        "top1": top1.float().mean().item(),
        "top5": (top == labels[:, None]).any(1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def image_folder(folder: Path, min_side: int | None = None
                 ) -> tuple[list[str], Iterator[tuple[Image.Image | np.ndarray, int]]]:
    """ImageFolder layout: (sorted class folder names, (image, label) pairs); `min_side`: see `decode_image`.
    Unreadable images and ones of more than MAX_IMAGE_PIXELS pixels are skipped, with a line saying so."""
    if not folder.is_dir():
        raise UserError(f"Image folder {folder} does not exist.")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{folder} has no class sub-folders: use the ImageFolder layout FOLDER/CLASS/IMAGE.")

    def items():
        for label, name in enumerate(classes):
            for path in image_files(folder / name):
                if (image := read_image_file(path, min_side)) is not None:
                    yield image, label

    return classes, items()


def labelled_shards(spec: str, min_side: int | None = None) -> Iterator[tuple[Image.Image | np.ndarray, int]]:
    for _, image, label in read_labelled(expand_urls(spec), min_side=min_side):
        yield image, label


@torch.no_grad()
def evaluate(model: CLIP, tokenizer: Callable, preprocess: EvalTransform, classnames: list[str],
             templates: list[str], samples: Iterator[tuple[Image.Image | np.ndarray, int]], batch_size: int = 128,
             device: torch.device | str = "cpu") -> dict[str, float]:
    model = model.eval().to(device)
    weights = classifier(model, tokenizer, classnames, templates, device)
    logits, labels, images, batch_labels = [], [], [], []

    def flush():
        if images:
            features = model.encode_image(preprocess.normalize(torch.stack(images).to(device))).float()
            logits.append((features @ weights.T).cpu())
            labels.extend(batch_labels)
            images.clear()
            batch_labels.clear()

    for image, label in samples:
        if not 0 <= label < len(classnames):
            raise UserError(f"A sample has class {label}, outside the {len(classnames)} class names given.")
        images.append(preprocess.pixels(image))
        batch_labels.append(label)
        if len(images) == batch_size:
            flush()
    flush()
    if not logits:
        raise UserError("No labelled image was found to classify.")
    result = accuracy(torch.cat(logits), torch.tensor(labels), len(classnames))
    return {**result, "num_images": len(labels), "num_classes": len(classnames)}
