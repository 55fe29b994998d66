"""Zero-shot classification: class names and prompt templates become a linear classifier.

Each class's weight is the normalised mean of the normalised text embeddings of its prompts
(CLIP, section 3.1.4). Metrics: top-1 and top-5 accuracy and the mean per-class recall
(balanced accuracy), as clip_benchmark reports them.
"""

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from multimodal.data.pixels import EvalTransform
from multimodal.errors import UserError, read_lines
from multimodal.eval import presets
from multimodal.eval.embed import encode_batch
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


def classes_and_templates(source, preset: str | None = None, classnames: Path | None = None,
                          templates: Path | None = None) -> tuple[list[str], list[str]]:
    """The class names in label order and the prompt templates for the labelled `source`
    (`ClassFolderSource` or `LabelledShardSource`): a preset's (`multimodal.eval.presets`; its classes
    checked against the class folders), or the `classnames` file's (for a folder, by default its class
    folders' names) with the built-in templates; a `templates` file replaces the templates of either."""
    folder = source.folder if hasattr(source, "classes") else None  # an ImageFolder's root, named in sentences
    if preset:
        chosen = presets.PRESETS[preset]()
        if folder is not None:
            presets.check_class_folders(chosen, source.classes, folder)
        names, prompts = list(chosen.classnames), list(chosen.templates)
    else:
        names = read_lines(classnames, "Class names") if classnames else \
            [name.replace("_", " ") for name in source.classes]
        if folder is not None and len(names) != len(source.classes):
            raise UserError(f"{classnames} names {len(names)} classes but {folder} has "
                            f"{len(source.classes)} class folders.")
        prompts = list(DEFAULT_TEMPLATES)
    return names, read_templates(templates) if templates else prompts


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
    """acc1, acc5 (top-1 and top-5 accuracy) and mean per-class recall of (N, C) logits against (N,)
    labels, named as CLIP_benchmark names them."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
    top1 = top[:, 0] == labels
    recalls = [top1[labels == c].float().mean() for c in range(num_classes) if (labels == c).any()]
    return {
        "acc1": top1.float().mean().item(),
        "acc5": (top == labels[:, None]).any(1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


@torch.no_grad()
def evaluate(model: CLIP, classnames: list[str], templates: list[str], batches: Iterable[dict],
             preprocess: EvalTransform | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall of the labelled images in `batches` (`EmbedBatches` of a
    `LabelledShardSource` or `ClassFolderSource`: each image row holds its "label"), encoded where the
    model is (`eval.embed.encode_batch`: JPEG bytes decoded there, pixels normalised with `preprocess`,
    the architecture's eval transform unless given)."""
    model = model.eval()
    preprocess = preprocess or model.architecture.eval_transform
    device = next(model.parameters()).device
    weights = classifier(model, model.architecture.tokenizer, classnames, templates, device).float().cpu()  # (C, D)
    logits, labels = [], []
    for batch in batches:
        batch, features, _ = encode_batch(model, batch, preprocess)
        if features is None:
            continue
        labels.extend(row["label"] for row in batch["image_rows"])
        logits.append(features @ weights.T)  # (B, C)
    if not logits:
        raise UserError("No labelled image was found to classify.")
    if not all(0 <= label < len(classnames) for label in labels):
        wrong = next(label for label in labels if not 0 <= label < len(classnames))
        raise UserError(f"A sample has class {wrong}, outside the {len(classnames)} class names given.")
    result = accuracy(torch.cat(logits), torch.tensor(labels), len(classnames))
    return {**result, "num_images": len(labels), "num_classes": len(classnames)}
