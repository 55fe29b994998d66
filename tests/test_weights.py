"""Loading checkpoints safely, and the open_clip export round trip."""

import pickle
from pathlib import Path

import open_clip
import pytest
import torch

from multimodal import arch
from multimodal.errors import UserError
from multimodal.weights import export, load_model


def probe_inputs(name: str = "tiny"):
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 64, 64, generator=g), arch.load(name).tokenizer(["a red circle", "two blue squares",
                                                                         "a cat", "a dog on a skateboard"])


def test_lightning_checkpoint_loads_the_trained_weights(trained):
    ckpt, module = trained
    model = load_model(ckpt)
    assert model.architecture is arch.load("tiny")
    images, tokens = probe_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), module.model.eval().encode_image(images))
        torch.testing.assert_close(model.encode_text(tokens), module.model.encode_text(tokens))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_round_trip_through_open_clip(cli, trained, tmp_path, suffix):
    ckpt, module = trained
    out = tmp_path / f"model{suffix}"
    proc = cli("export", "--checkpoint", str(ckpt), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "tiny.json").is_file()

    open_clip.add_model_config(tmp_path / "tiny.json")
    theirs, _, preprocess = open_clip.create_model_and_transforms("tiny", pretrained=str(out))
    theirs.eval()
    images, tokens = probe_inputs()
    ours = module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images, normalize=True), ours.encode_image(images))
        torch.testing.assert_close(theirs.encode_text(tokens, normalize=True), ours.encode_text(tokens))
        assert theirs.logit_scale.item() == pytest.approx(ours.logit_scale.item())
    # ... and our loader reads the exported file back given its architecture.
    again = load_model(out, "tiny")
    with torch.no_grad():
        torch.testing.assert_close(again.eval().encode_image(images), ours.encode_image(images))


def test_siglip_export_round_trip_keeps_the_bias(tmp_path):
    from multimodal.recipe import build_module

    torch.manual_seed(0)
    ours = build_module(model_name="tiny", loss="siglip").model.eval()
    with torch.no_grad():
        ours.logit_bias.fill_(-7.5)
    written = export(ours, tmp_path / "s.safetensors")
    assert written[1].name == "tiny-siglip.json"
    open_clip.add_model_config(written[1])
    theirs = open_clip.create_model("tiny-siglip", pretrained=str(written[0])).eval()
    assert theirs.logit_bias.item() == -7.5
    images, tokens = probe_inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images, normalize=True), ours.encode_image(images))
    again = load_model(written[0], "tiny")  # our loader sees the bias in the file
    assert again.logit_bias.item() == -7.5


def test_mismatched_architecture_is_a_user_error(cli, trained, tmp_path):
    ckpt, module = trained
    export(module.model, tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="does not match architecture RN50"):
        load_model(tmp_path / "m.safetensors", "RN50")
    with pytest.raises(UserError, match="does not match architecture ViT-B-32"):
        load_model(ckpt, "ViT-B-32")
    with pytest.raises(UserError, match="pass model"):
        load_model(tmp_path / "m.safetensors")
    proc = cli("export", "--checkpoint", str(ckpt), "--model", "ViT-B-32", "--out", str(tmp_path / "x.pt"),
               cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not match architecture ViT-B-32" in proc.stderr.strip().splitlines()[-1]


def test_a_pickled_payload_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("evil.pt", "evil.ckpt"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"state_dict": {"x": Payload()}}, f)
        with pytest.raises(UserError, match="tensors and plain values"):
            load_model(tmp_path / name, "tiny")
    assert not marker.exists()
