"""The two-tower model: architectures resolved once (open_clip names or JSON), unit-norm features,
logit_scale init."""

import json
import math

import pytest
import torch

from multimodal import arch
from multimodal.data.pixels import EvalTransform, TrainCrop
from multimodal.errors import UserError
from multimodal.model import create_model
from tests.conftest import open_clip_transforms


def test_tiny_encodes_to_unit_norm_features():
    model = create_model(arch.load("tiny")).eval()
    images = torch.randn(3, 3, 64, 64)
    tokens = arch.load("tiny").tokenizer(["a red circle", "two blue squares", ""])
    image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == text_features.shape == (3, 128)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert scale.item() == pytest.approx(1 / 0.07)


def test_state_dict_is_open_clips():
    import open_clip

    model = create_model(arch.load("tiny"))
    reference = open_clip.create_model("tiny")  # registered with open_clip by arch.load
    assert model.towers.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("name,size", [("ViT-B-32", 224), ("RN50", 224)])
def test_open_clip_architectures_by_name(name, size):
    architecture = arch.load(name)
    model = create_model(architecture).eval()
    train, val = open_clip_transforms(architecture)
    from PIL import Image

    image = val(Image.new("RGB", (300, 200), (10, 200, 30)))
    assert image.shape == (3, size, size) and train(Image.new("RGB", (300, 200))).shape == image.shape
    with torch.no_grad():
        features = model.encode_image(image[None])
    assert features.shape[0] == 1
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(1))


def test_model_from_a_json_path(tmp_path):
    cfg = json.loads((arch.MODEL_CONFIG_DIR / "tiny.json").read_text())
    cfg["embed_dim"] = 64
    path = tmp_path / "my-arch.json"
    path.write_text(json.dumps(cfg))
    architecture = arch.load(str(path))
    assert (architecture.open_clip_name, architecture.own, architecture.embed_dim) == ("my-arch", True, 64)
    model = create_model(architecture)
    assert model.encode_text(architecture.tokenizer(["hi"])).shape == (1, 64)


def test_unknown_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="Unknown model 'ViT-Z-1'"):
        arch.load("ViT-Z-1")
    with pytest.raises(UserError, match="does not exist"):
        arch.load(str(tmp_path / "nothing.json"))


@pytest.mark.parametrize("name", ["tiny", "ViT-B-32"])
def test_an_architecture_is_resolved_once_into_a_frozen_object(name):
    """One object per name, that no caller can change, holding what open_clip gives for the architecture."""
    import dataclasses

    import open_clip

    architecture = arch.load(name)
    assert arch.load(name) is architecture
    with pytest.raises(dataclasses.FrozenInstanceError):
        architecture.image_size = 32
    architecture.config["vision_cfg"]["image_size"] = 32  # a copy
    config = open_clip.get_model_config(architecture.open_clip_name)
    assert architecture.config == config and architecture.own == (name == "tiny")

    towers = architecture.create_towers()
    _, _, val = open_clip.create_model_and_transforms(architecture.open_clip_name)
    resize, crop, *_, normalize = val.transforms
    size = config["vision_cfg"]["image_size"]
    assert architecture.image_size == size == towers.visual.image_size[0] == resize.size == crop.size[0]
    pre = architecture.preprocessing
    assert TrainCrop.of(pre).size == EvalTransform.of(pre).size == pre.size == size
    assert EvalTransform.of(pre).mean == pre.mean == tuple(normalize.mean) == towers.visual.preprocess_cfg["mean"]
    assert EvalTransform.of(pre).std == pre.std == tuple(normalize.std) == towers.visual.preprocess_cfg["std"]
    assert architecture.embed_dim == config["embed_dim"] == towers.text_projection.shape[1]

    tokenizer = open_clip.get_tokenizer(architecture.open_clip_name)
    context = config["text_cfg"].get("context_length", 77)
    assert architecture.context_length == tokenizer.context_length == context == towers.context_length
    texts = ["a red circle", "two blue squares"]
    assert torch.equal(architecture.tokenizer(texts), tokenizer(texts))
    assert architecture.tokenizer(texts).shape == (2, context)
