"""The module's options for large models and batches, through real Lightning steps:
micro-batches, SigLIP, gradient checkpointing, patch dropout, locked towers, pretrained weights, compile."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from multimodal import arch
from multimodal.data.batch import TrainBatch
from multimodal.errors import UserError
from multimodal.module import CLIPModule
from multimodal.recipe import build_module
from multimodal.weights import export
from tests.conftest import REPO

DEBUG = str(REPO / "configs" / "debug.yaml")


def fixed_batch(n: int = 12) -> TrainBatch:
    g = torch.Generator().manual_seed(3)
    words = ["red", "green", "blue", "square", "circle", "small", "large", "left", "right", "a", "two"]
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (5,), generator=g)) for _ in range(n)]
    return TrainBatch(torch.randn(n, 3, 64, 64, generator=g), arch.load("tiny").tokenizer(texts),
                      [str(i) for i in range(n)], read=n)


class GradCapture(pl.Callback):
    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def step(module: CLIPModule, steps: int = 1, precision: str = "32-true") -> GradCapture:
    capture = GradCapture()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[capture])
    trainer.fit(module, train_dataloaders=DataLoader([fixed_batch()] * steps, batch_size=None))
    return capture


def module(**kwargs) -> CLIPModule:
    torch.manual_seed(0)
    return build_module(model_name="tiny", warmup_steps=0, **kwargs)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_micro_batches_give_the_gradients_of_the_whole_batch(loss):
    whole = step(module(loss=loss)).grads[0]
    cached = step(module(loss=loss, micro_batches=3)).grads[0]
    assert whole.keys() == cached.keys()
    assert ("model.towers.logit_bias" in whole) == (loss == "siglip")
    for name in whole:
        torch.testing.assert_close(cached[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batches_under_bf16_autocast_follow_the_whole_batch():
    whole = step(module(), precision="bf16-mixed").grads[0]
    cached = step(module(micro_batches=2), precision="bf16-mixed").grads[0]
    for name in ("model.towers.visual.proj", "model.towers.text_projection", "model.towers.logit_scale"):
        cos = torch.nn.functional.cosine_similarity(cached[name].flatten(), whole[name].flatten(), dim=0)
        assert cos > 0.99, name


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = step(module()).grads[0]
    checkpointed = step(module(grad_checkpointing=True)).grads[0]
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_siglip_starts_at_its_published_temperature_and_bias():
    m = module(loss="siglip")
    assert m.model.logit_scale.exp().item() == pytest.approx(10.0)
    assert m.model.logit_bias.item() == -10.0
    assert module().model.logit_bias is None


def test_patch_dropout_in_training_only():
    m = module(patch_dropout=0.5)
    images = fixed_batch(4).image
    m.model.train()
    assert not torch.allclose(m.model.encode_image(images), m.model.encode_image(images))
    m.model.eval()
    plain = module()
    plain.model.load_state_dict(m.model.state_dict())
    torch.testing.assert_close(m.model.encode_image(images), plain.model.eval().encode_image(images))


def test_locked_image_tower_does_not_move_and_unlocked_groups_do():
    m = module(lock_image=True, lr=1e-2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = step(m, steps=2).grads[0]
    assert not any(n.startswith("model.towers.visual.") for n in grads)
    after = dict(m.named_parameters())
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        assert moved == (not name.startswith("model.towers.visual.")), name

    partly = module(lock_image=True, lock_image_unlocked_groups=1)
    trainable = {n for n, p in partly.named_parameters() if p.requires_grad and n.startswith("model.towers.visual.")}
    assert trainable and all("transformer.resblocks.0." not in n for n in trainable)


def test_locked_text_tower_trains_only_the_image_side_and_scale():
    m = module(lock_text=True)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "model.towers.logit_scale" in trainable
    assert not any(n.startswith(("model.towers.transformer.", "model.towers.token_embedding")) for n in trainable)
    assert any(n.startswith("model.towers.visual.") for n in trainable)
    step(m)


def test_fine_tunes_from_an_open_clip_state_dict(tmp_path):
    source = module()
    with torch.no_grad():
        source.model.towers.visual.proj.add_(1.0)
    export(source.model, tmp_path / "tiny.safetensors")
    tuned = module(pretrained=str(tmp_path / "tiny.safetensors"))
    for (name, a), b in zip(source.model.state_dict().items(), tuned.model.state_dict().values()):
        assert torch.equal(a, b), name
    siglip = module(loss="siglip", pretrained=str(tmp_path / "tiny.safetensors"))  # CLIP weights, fresh bias
    assert torch.equal(siglip.model.towers.visual.proj, source.model.towers.visual.proj)
    with pytest.raises(UserError, match="does not exist"):
        module(pretrained=str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_compiled_towers_train_and_keep_their_names():
    m = module(compile=True)
    names = set(m.state_dict())
    step(m, steps=2)
    assert set(m.state_dict()) == names and not any("_orig_mod" in n for n in names)


def test_siglip_with_micro_batches_through_the_cli(cli, tmp_path):
    proc = cli("train", "--config", DEBUG, "--model.loss", "siglip", "--model.micro_batches", "2",
               "--trainer.max_steps", "5", "--trainer.val_check_interval", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = (tmp_path / "runs" / "debug" / "version_0" / "metrics.csv").read_text()
    assert "train/logit_bias" in metrics and "val/loss" in metrics


def test_bad_scale_options_are_one_sentence(cli, tmp_path):
    proc = cli("train", "--config", DEBUG, "--model.micro_batches", "0", cwd=tmp_path)
    assert proc.returncode != 0 and "micro_batches must be 1 or more" in proc.stderr
    assert "Traceback" not in proc.stderr
