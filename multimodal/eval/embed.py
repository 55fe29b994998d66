"""Embedding the samples of shards with a model, in order, in one process.

Returns everything the retrieval metrics need: image features, the features of every caption
(all of them, not one drawn at random) and each caption's image index.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from multimodal.data.pipeline import read_samples
from multimodal.model import CLIP


@dataclass
class Embeddings:
    image_features: torch.Tensor  # (N, D)
    text_features: torch.Tensor  # (M, D)
    text_to_image: torch.Tensor  # (M,)
    keys: list[str]  # (N,)
    captions: list[str]  # (M,)


@torch.no_grad()
def embed_shards(model: CLIP, urls: list[str], image_transform: Callable, tokenizer: Callable,
                 batch_size: int = 256, device: str | torch.device = "cpu") -> Embeddings:
    model = model.eval().to(device)
    keys, captions, text_to_image, image_chunks, images = [], [], [], [], []

    def flush() -> None:
        if images:
            image_chunks.append(model.encode_image(torch.stack(images).to(device)).float().cpu())
            images.clear()

    for key, image, caps in read_samples(urls):
        text_to_image.extend([len(keys)] * len(caps))
        keys.append(key)
        captions.extend(caps)
        images.append(image_transform(image))
        if len(images) == batch_size:
            flush()
    flush()
    text_chunks = [
        model.encode_text(tokenizer(captions[i:i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(captions), batch_size)
    ]
    return Embeddings(torch.cat(image_chunks), torch.cat(text_chunks), torch.tensor(text_to_image), keys, captions)
