"""The two-tower model: open_clip towers by name or JSON, unit-norm features, logit_scale init."""

import json
import math

import pytest
import torch

from multimodal import arch
from multimodal.errors import UserError
from multimodal.model import create_model


def test_tiny_encodes_to_unit_norm_features():
    model = create_model("tiny").eval()
    images = torch.randn(3, 3, 64, 64)
    tokens = arch.tokenizer("tiny")(["a red circle", "two blue squares", ""])
    image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == text_features.shape == (3, 128)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert scale.item() == pytest.approx(1 / 0.07)


def test_state_dict_is_open_clips():
    import open_clip

    model = create_model("tiny")
    reference = open_clip.create_model(arch.resolve("tiny"))
    assert model.towers.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("name,size", [("ViT-B-32", 224), ("RN50", 224)])
def test_open_clip_architectures_by_name(name, size):
    model = create_model(name).eval()
    train, val = arch.transforms(name)
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
    model = create_model(str(path))
    assert model.encode_text(arch.tokenizer(str(path))(["hi"])).shape == (1, 64)


def test_unknown_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="Unknown model 'ViT-Z-1'"):
        create_model("ViT-Z-1")
    with pytest.raises(UserError, match="does not exist"):
        create_model(str(tmp_path / "nothing.json"))
