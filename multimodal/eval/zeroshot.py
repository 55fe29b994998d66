"""Zero-shot classification: class names and prompt templates become a linear classifier.

Each class's weight is the normalised mean of the normalised text embeddings of its prompts
(CLIP, section 3.1.4). Metrics: top-1 and top-5 accuracy and the mean per-class recall
(balanced accuracy), as clip_benchmark reports them.
"""

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from multimodal.data.batch import EvalBatch
from multimodal.data.pixels import EvalTransform
from multimodal.data.sources import ClassFolderSource, ShardSource
from multimodal.errors import UserError
from multimodal.eval import presets
from multimodal.eval.embed import labelled_features
from multimodal.model import CLIP
from multimodal.userfiles import read_lines, read_text

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


def template(text: str, where: str) -> str:
    """A prompt template with `{}` for the class name, from one written with `{}` or with CLIP_benchmark's
    `{c}`; any other brace (`{0}`, `{name}`, a stray `}`, `{{`), or both forms, is refused: `str.format`
    would misread it. `where` names its line ("templates.txt line 3")."""
    ours = text.replace("{c}", "{}") if "{c}" in text and "{}" not in text else text
    if ours.count("{}") != 1 or ours.replace("{}", "").count("{") + ours.replace("{}", "").count("}"):
        raise UserError(f"Template '{text}' in {where} must hold the class name's place once, as {{}} or {{c}}, and "
                        "no other brace.")
    return ours


def read_templates(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    lines = read_lines(path, "Templates")
    numbers = [n for n, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]  # as read_lines
    return [template(t, f"{path} line {n}") for t, n in zip(lines, numbers)]


def classes_and_templates(source, preset: str | None = None, classnames: Path | None = None,
                          templates: Path | None = None, setting: str = "{}") -> tuple[list[str], list[str]]:
    """The class names in label order and the prompt templates for the labelled `source`
    (`ClassFolderSource` or `LabelledShardSource`): a preset's (`multimodal.eval.presets`; its classes
    checked against the class folders), or the `classnames` file's, or a CLIP_benchmark dataset's own
    `classnames.txt` and templates, or for a folder its class folders' names; the built-in templates when
    none of these has any; a `templates` file replaces the templates of either. `setting` names a setting
    in the caller's words ("--{}" on a command line)."""
    folder = source.folder if isinstance(source, ClassFolderSource) else None  # named in sentences
    benchmark = source.shards.benchmark if isinstance(source, ShardSource) else None
    if preset:
        chosen = presets.PRESETS[preset]()
        if folder is not None:
            presets.check_class_folders(chosen, source.classes, folder)
        names, prompts = list(chosen.classnames), list(chosen.templates)
    elif classnames:
        names, prompts = read_lines(classnames, "Class names"), list(DEFAULT_TEMPLATES)
    elif benchmark is not None and benchmark.classnames:
        names = list(benchmark.classnames)
        prompts = [template(t, f"the dataset's zeroshot_classification_templates.txt (template {n})")
                   for n, t in enumerate(benchmark.templates, start=1)] \
            if benchmark.templates else list(DEFAULT_TEMPLATES)
    elif folder is not None:
        names, prompts = [name.replace("_", " ") for name in source.classes], list(DEFAULT_TEMPLATES)
    else:
        raise UserError(f"Shards need {setting.format('classnames')} or {setting.format('preset')}, the names of "
                        "the class indices in label order (a CLIP_benchmark dataset names them in its classnames.txt).")
    if folder is not None and not preset and len(names) != len(source.classes):
        raise UserError(f"{classnames} names {len(names)} classes but {folder} has "
                        f"{len(source.classes)} class folders.")
    return names, read_templates(templates) if templates else prompts


@torch.no_grad()
def classifier(model: CLIP, tokenizer: Callable, classnames: list[str], templates: list[str],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(C, D) unit-norm class embeddings."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.replace("{}", name) for t in templates]).to(device)
        weights.append(F.normalize(model.encode_text(tokens).float().mean(0), dim=-1))
    return torch.stack(weights)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """acc1, acc5 (top-1 and top-5 accuracy) and mean per-class recall of (N, C) logits against (N,)
    labels, named and computed as CLIP_benchmark does: acc5 is NaN with fewer than 5 classes (every image
    would be right), the recall is averaged over the classes that have images."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, 5)
    top1 = top[:, 0] == labels
    # counts divided in float64, as CLIP_benchmark divides them: its figures to the last digit
    recalls = [int(top1[labels == c].sum()) / int((labels == c).sum()) for c in range(num_classes)
               if (labels == c).any()]
    return {
        "acc1": int(top1.sum()) / len(labels),
        "acc5": int((top == labels[:, None]).any(1).sum()) / len(labels) if num_classes >= 5 else float("nan"),
        "mean_per_class_recall": float(np.mean(recalls)),
    }


@torch.no_grad()
def evaluate(model: CLIP, classnames: list[str], templates: list[str], batches: Iterable[EvalBatch],
             preprocess: EvalTransform | None = None) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall of the labelled images in `batches` (`EvalBatches` of a
    `LabelledShardSource` or `ClassFolderSource`), encoded where the model is (`eval.embed.labelled_features`)."""
    model = model.eval()
    device = next(model.parameters()).device
    weights = classifier(model, model.architecture.tokenizer, classnames, templates, device).float().cpu()  # (C, D)
    features, labels = labelled_features(model, batches, preprocess)
    if not all(0 <= label < len(classnames) for label in labels.tolist()):
        wrong = next(label for label in labels.tolist() if not 0 <= label < len(classnames))
        raise UserError(f"A sample has class {wrong}, outside the {len(classnames)} class names given.")
    result = accuracy(features @ weights.T, labels, len(classnames))  # (N, C) logits
    return {**result, "num_images": len(labels), "num_classes": len(classnames)}
