"""Published weights by name, offline: a tag registered for the tiny architecture and an `hf-hub:` repository,
their files pre-seeded in a folder laid out as the Hugging Face hub client lays out its cache, loaded through
the same code path as open_clip's own tags (`open_clip.download_pretrained` -> `hf_hub_download`)."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from multimodal import arch, pretrained, weights
from multimodal.data.pixels import EvalTransform
from multimodal.model import create_model
from tests.conftest import open_clip_transforms

TAG = "multimodal_test"
REPO, HUB_REPO = "multimodal-test/tiny-clip", "multimodal-test/tiny-hub"
SIGLIP_LIKE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "resize_mode": "squash"}


def seed(cache, repo: str, files: dict[str, bytes]) -> None:
    """Files of `repo` as `hf_hub_download` leaves them in `cache`: models--ORG--NAME/refs/main holds the
    commit, snapshots/COMMIT/FILE the file."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / "snapshots" / commit / name).write_bytes(data)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(cache folder, the tag's state dict): the tag `multimodal_test` of `tiny` and the repository
    `hf-hub:multimodal-test/tiny-hub`, both with SigLIP-like preprocessing, seeded in a fresh cache."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in create_model(arch.load("tiny")).towers.state_dict().items()}
    path = cache.parent / "w.safetensors"
    save_file(state, path)
    seed(cache, REPO, {"open_clip_model.safetensors": path.read_bytes()})
    config = {"model_cfg": arch.load("tiny").config, "preprocess_cfg": SIGLIP_LIKE}
    seed(cache, HUB_REPO, {"open_clip_config.json": json.dumps(config).encode(),
                           "open_clip_model.safetensors": path.read_bytes()})
    pretrained.register("tiny", TAG, hf_hub=f"{REPO}/", **SIGLIP_LIKE)
    return cache, state


def same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.towers.state_dict().items())


def test_a_tag_loads_from_the_cache_with_its_preprocessing(published):
    cache, state = published
    model = weights.load_model(None, "tiny", pretrained=TAG, cache_dir=cache)
    assert same(model, state)
    assert model.architecture is arch.load("tiny", TAG, cache)
    pre = model.architecture.preprocessing
    assert (pre.mean, pre.std, pre.interpolation, pre.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "bilinear", "squash")
    assert arch.load("tiny").preprocessing.resize_mode == "shortest"  # the architecture alone: open_clip's defaults


def test_a_hub_repository_brings_its_config_preprocessing_and_weights(published):
    cache, state = published
    model = weights.load_model(None, f"hf-hub:{HUB_REPO}", cache_dir=cache)
    assert same(model, state)
    assert model.architecture.preprocessing.resize_mode == "squash"
    assert model.architecture.short_name == "tiny-hub"


def test_squashed_eval_transform_matches_open_clips(published):
    """resize_mode squash as open_clip's own eval transform does it, within a level or two in 255."""
    from PIL import Image

    architecture = arch.load("tiny", TAG, published[0])
    rng = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (90, 150, 3), generator=rng, dtype=torch.uint8).numpy())
    ours = EvalTransform.of(architecture.preprocessing)(image)
    theirs = open_clip_transforms(architecture)[1](image)
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert (ours - theirs).abs().max() * 0.5 * 255 <= 2.0


def test_commands_load_published_weights_by_name(cli, published, tmp_path):
    cache, state = published
    result = cli("export", "--model", "tiny", "--pretrained", TAG, "--cache_dir", str(cache), "--out", "m.safetensors",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(torch.equal(v, state[k]) for k, v in load_file(tmp_path / "m.safetensors").items())
    (tmp_path / "t.txt").write_text("a red square\na blue circle\n")
    result = cli("embed", "--model", f"hf-hub:{HUB_REPO}", "--cache-dir", str(cache), "--texts", "t.txt",
                 "--out", "emb", "--num_workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "emb" / "info.json").read_text())
    assert info["model"] == f"hf-hub:{HUB_REPO}" and info["checkpoint"] is None
    result = cli("search", "--index", "emb", "--text", "a red square", "--k", "1", "--cache_dir", str(cache),
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "a red square" in result.stdout


def test_training_starts_from_a_tag_and_its_checkpoint_keeps_the_tags_preprocessing(published, tmp_path):
    import pytorch_lightning as pl

    from multimodal.data.datamodule import ShardDataModule
    from multimodal.data.shards import write_synthetic
    from multimodal.recipe import build_module

    cache, state = published
    module = build_module("tiny", pretrained=TAG, cache_dir=str(cache), lr=1e-3, warmup_steps=1)
    assert same(module.model, state)
    write_synthetic(tmp_path / "data", num_samples=16, shard_size=16)
    data = ShardDataModule(str(tmp_path / "data"), pretrained=TAG, cache_dir=str(cache), batch_size=8, num_workers=0)
    assert data.preprocess.resize_mode == "squash"
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    model = weights.load_model(tmp_path / "last.ckpt", cache_dir=cache)
    assert model.architecture is arch.load("tiny", TAG, cache)
    assert not same(model, state)  # trained on from the tag's weights


def test_models_lists_open_clips_tags_and_the_projects(cli, published, tmp_path):
    result = cli("models", "ViT-B-32", "tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert "laion2b_s34b_b79k" in lines["ViT-B-32"] and "open_clip" in lines["ViT-B-32"]
    assert TAG in lines["tiny"] and "project" in lines["tiny"]


@pytest.mark.parametrize("args, sentence", [
    (["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b80k"],
     "Unknown pretrained tag 'laion2b_s34b_b80k' for ViT-B-32: did you mean laion2b_s34b_b79k"),
    (["--model", "RN50", "--pretrained", "laion2b_s34b_b79k"],
     "Pretrained tag 'laion2b_s34b_b79k' exists for ViT-B-32, not for RN50"),
    (["--model", "tiny", "--pretrained", TAG, "--cache_dir", "empty"],
     f"The weights of tiny '{TAG}' are not in the cache folder empty and could not be downloaded "
     "(HF_HUB_OFFLINE is set)"),
    (["--model", "hf-hub:nobody/nothing", "--cache_dir", "empty"],
     "The model files of hf-hub:nobody/nothing (open_clip_config.json) are not in the cache folder empty"),
    (["--pretrained", TAG], f"--pretrained {TAG} needs --model"),
    (["--model", "tiny"], "Pass --checkpoint FILE, or --model NAME --pretrained TAG"),
    (["--model", "tiny", "--pretrained", "missing.safetensors"], "missing.safetensors does not exist"),
])
def test_bad_names_are_one_sentence(cli, published, tmp_path, args, sentence):
    result = cli("export", *args, "--out", "m.safetensors", cwd=tmp_path)
    assert result.returncode == 2
    assert sentence in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "m.safetensors").exists()


def test_the_hugging_face_cache_of_hf_home_is_the_default(published, tmp_path):
    """No --cache_dir: the hub client's own default, $HF_HOME/hub, read in a process started with HF_HOME set."""
    from tests.conftest import run_cli

    cache, state = published
    result = run_cli("export", "--model", f"hf-hub:{HUB_REPO}", "--out", "m.safetensors", cwd=tmp_path,
                     env={"HF_HOME": str(cache.parent), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert all(torch.equal(v, state[k]) for k, v in load_file(tmp_path / "m.safetensors").items())
    assert json.loads((tmp_path / "tiny-hub.json").read_text())["embed_dim"] == arch.load("tiny").embed_dim


def test_train_takes_a_tag_from_the_command_line_and_the_data_follows_it(cli, published, tmp_path):
    """`--model.pretrained` and `--model.cache_dir` reach the data section too (its eval transform is the tag's)."""
    from tests.conftest import REPO

    cache, _ = published
    result = cli("train", "--config", str(REPO / "configs" / "debug.yaml"), "--trainer.max_steps", "1",
                 "--model.pretrained", TAG, "--model.cache_dir", str(cache), "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"pretrained: {TAG}" in result.stdout and f"cache_dir: {cache}" in result.stdout
    result = cli("train", "--config", str(REPO / "configs" / "debug.yaml"), "--trainer.max_steps", "1",
                 "--model.pretrained", TAG, "--model.cache_dir", str(cache), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    assert weights.load_model(ckpt, cache_dir=cache).architecture is arch.load("tiny", TAG, cache)
