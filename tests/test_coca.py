"""CoCa: a caption decoder trained beside the contrastive loss (`model.loss coca`), and everything the
trainer already does with a model (export, embed, eval retrieval) working with it."""

import json

import open_clip
import pytest
import torch

from multimodal import arch, weights
from multimodal.errors import UserError
from multimodal.loss import CocaLoss, caption_loss
from multimodal.model import create_model
from tests.conftest import REPO


def test_the_loss_is_open_clips_coca_loss():
    torch.manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 16), dim=-1) for _ in range(2))
    logits, labels = torch.randn(6, 9, 50), torch.randint(1, 50, (6, 9))
    labels[:, 6:] = 0  # padding, ignored
    scale = torch.tensor(14.0)
    theirs = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(image, text, logits, labels, scale)
    model = type("M", (), {"logit_scale": scale.log(), "logit_bias": None,
                           "forward_captions": lambda self, i, t, length=None: (image, text, logits, labels)})()
    ours = CocaLoss(2.0).terms(model, None, None)
    assert torch.allclose(ours["contrastive_loss"], theirs[0]) and torch.allclose(ours["caption_loss"], theirs[1])
    assert torch.allclose(caption_loss(logits, labels), torch.nn.functional.cross_entropy(
        logits[:, :6].reshape(-1, 50), labels[:, :6].reshape(-1)))


def test_the_decoder_reads_only_as_far_as_the_longest_caption_and_the_loss_is_the_same():
    """`length` (the pipeline's count of the batch's longest caption) cuts the decoder's input: the logits
    kept are open_clip's CoCa's for those positions, and the loss and its gradients are those of the whole
    context, whose other positions are padding."""
    from multimodal.data.batch import text_length

    torch.manual_seed(0)
    model = create_model(arch.load("tiny-coca"))
    tokenizer = model.architecture.tokenizer
    tokens = tokenizer(["a red square", "two small blue circles on the left of a green triangle", "a dog"])
    size = model.architecture.image_size
    images = torch.randn(3, 3, size, size)
    length = text_length(tokens)
    assert length == 13 and (tokens[:, length:] == 0).all() and (tokens[1, length - 1] != 0)

    theirs = model.towers(images, tokens)
    image_features, text_features, logits, labels = model.forward_captions(images, tokens, length)
    assert logits.shape[:2] == labels.shape == (3, 15)  # 13 tokens, rounded up to 16, less the first label
    torch.testing.assert_close(logits, theirs["logits"][:, :15], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(image_features, theirs["image_features"])
    torch.testing.assert_close(text_features, theirs["text_features"])

    def loss_and_grads(length):
        model.zero_grad()
        loss = sum(CocaLoss(2.0).terms(model, images, tokens, gather=False, length=length).values())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (cut, cut_grads), (whole, whole_grads) = loss_and_grads(length), loss_and_grads(None)
    torch.testing.assert_close(cut, whole, rtol=1e-6, atol=1e-6)
    assert cut_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(cut_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert text_length(torch.zeros(2, 77, dtype=torch.long)) == 0


def test_a_fresh_caption_decoder_is_initialised_not_left_as_empty_memory():
    """open_clip's CoCa leaves its decoder's text_projection as torch.empty; ours starts from N(0, 1/width)."""
    garbage = torch.empty(128, 49408)
    garbage.fill_(1e30)  # what an uninitialised tensor may hold
    del garbage
    for _ in range(2):
        decoder = create_model(arch.load("tiny-coca")).towers.text_decoder
        projection = decoder.text_projection
        assert torch.isfinite(projection).all()
        assert projection.std().item() == pytest.approx(128 ** -0.5, rel=0.05) and abs(projection.mean()) < 1e-3


@pytest.fixture(scope="module")
def coca_run(tmp_path_factory):
    """(checkpoint, its module) of tiny-coca after a few CoCa steps on synthetic scenes."""
    import pytorch_lightning as pl

    from multimodal.data.datamodule import ShardDataModule
    from multimodal.data.shards import write_synthetic
    from multimodal.recipe import build_module

    root = tmp_path_factory.mktemp("coca")
    write_synthetic(root / "data", num_samples=48, shard_size=16)
    module = build_module("tiny-coca", loss="coca", lr=1e-3, warmup_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=pl.loggers.CSVLogger(root), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         default_root_dir=root)
    trainer.fit(module, datamodule=ShardDataModule(str(root / "data"), model_name="tiny-coca", batch_size=8,
                                                   num_workers=0))
    trainer.save_checkpoint(root / "last.ckpt")
    return root, module


def test_coca_trains_with_both_losses_logged(coca_run):
    import csv

    root, _ = coca_run
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    for key in ("train/loss", "train/contrastive_loss", "train/caption_loss"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert values and all(v > 0 for v in values), key
    caption = [float(r["train/caption_loss"]) for r in rows if r.get("train/caption_loss")]
    assert caption[0] / 2.0 == pytest.approx(10.8, abs=1.0)  # ln(49408) at the start: the decoder knows nothing yet


def test_export_loads_in_open_clip_as_coca(cli, coca_run, tmp_path):
    root, module = coca_run
    result = cli("export", "--checkpoint", str(root / "last.ckpt"), "--out", "coca.safetensors", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    open_clip.add_model_config(tmp_path / "tiny-coca.json")
    theirs, _, _ = open_clip.create_model_and_transforms("tiny-coca", pretrained=str(tmp_path / "coca.safetensors"))
    assert isinstance(theirs, open_clip.CoCa)
    images = torch.randn(2, 3, 64, 64)
    tokens = arch.load("tiny-coca").tokenizer(["a red circle", "two blue squares"])
    ours = weights.load_model(root / "last.ckpt").eval()
    with torch.no_grad():
        assert torch.allclose(theirs.eval()(images, tokens)["logits"], ours.forward_captions(images, tokens)[2],
                              atol=1e-5)


def test_embed_and_eval_retrieval_with_a_coca_checkpoint(cli, coca_run, tmp_path):
    root, _ = coca_run
    result = cli("embed", "--checkpoint", str(root / "last.ckpt"), "--shards", str(root / "data"), "--num_workers",
                 "0", "--dtype", "float32", "--out", "emb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = cli("eval", "retrieval", "--embeddings", "emb", "--out", "a.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = cli("eval", "retrieval", "--checkpoint", str(root / "last.ckpt"), "--shards", str(root / "data"),
                 "--num_workers", "0", "--out", "b.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["num_images"] == b["num_images"] == 48 and a["metrics"] == b["metrics"]


@pytest.mark.parametrize("settings, says", [
    (dict(model_name="tiny", loss="coca"), "tiny has none"),
    (dict(model_name="tiny-coca", loss="clip"), "tiny-coca has one, so use model.loss coca"),
    (dict(model_name="tiny-coca", loss="coca", micro_batches=2), "set model.micro_batches to 1"),
])
def test_coca_settings_that_cannot_work_are_one_sentence(settings, says):
    from multimodal.recipe import build_module

    with pytest.raises(UserError, match=says):
        build_module(**settings)


def test_train_command_takes_coca_in_bf16_and_resumes(cli, tmp_path):
    """Through the CLI, in bf16-mixed (the GPU recipes' precision, on the CPU here), stopped after 2 steps
    and resumed to 4 from the run folder: the optimizer state and the step carry over."""
    common = ["train", "--config", str(REPO / "configs" / "debug.yaml"), "--model.model_name", "tiny-coca",
              "--model.loss", "coca", "--data.batch_size", "8", "--trainer.precision", "bf16-mixed",
              "--trainer.log_every_n_steps", "1"]
    result = cli(*common, "--trainer.max_steps", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "debug" / "version_0"
    result = cli(*common, "--trainer.max_steps", "4", "--resume", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"][0]["state"]
    steps = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    caption = steps[0].index("train/caption_loss")
    assert sorted(int(r[steps[0].index("step")]) for r in steps[1:] if r[caption]) == [0, 1, 2, 3]
    assert weights.load_model(run / "checkpoints" / "last.ckpt").has_caption_decoder
    assert not create_model(arch.load("tiny")).has_caption_decoder


def test_caption_writes_resumes_and_draws(cli, coca_run, tmp_path):
    root, _ = coca_run
    common = ["caption", "--checkpoint", str(root / "last.ckpt"), "--shards", str(root / "data"), "--num_workers",
              "0", "--strategy", "top_p", "--top_p", "0.9", "--temperature", "1.0", "--max_length", "8",
              "--batch_size", "8"]
    result = cli(*common, "--out", "caps.jsonl", "--grid", "caps.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "caps.jsonl").read_text().splitlines()]
    assert len(lines) == 48 and all(isinstance(r["caption"], str) and r["key"] for r in lines)
    assert "Wrote 48 captions" in result.stdout
    assert (tmp_path / "caps.png").read_bytes()[:4] == b"\x89PNG"
    first = (tmp_path / "caps.jsonl").read_text()
    (tmp_path / "caps.jsonl.parts" / "part-00001.jsonl").unlink()  # as if interrupted before the second part
    result = cli(*common, "--out", "caps.jsonl", cwd=tmp_path)
    assert "2 of 3 parts already done; captioning 1." in result.stdout
    assert (tmp_path / "caps.jsonl").read_text() == first  # seeded per part: the same captions
    result = cli(*common[:-2], "--batch_size", "8", "--seed", "1", "--out", "caps.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "made with other settings (seed)" in result.stderr


def test_eval_captioning_reports_bleu_and_cider(cli, coca_run, tmp_path):
    root, _ = coca_run
    result = cli("eval", "captioning", "--checkpoint", str(root / "last.ckpt"), "--shards", str(root / "data"),
                 "--num_workers", "0", "--strategy", "greedy", "--max_length", "8", "--out", "c.json",
                 "--captions", "c.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["task"] == "captioning" and record["num_images"] == 48
    assert {"bleu4", "cider"} <= set(record["metrics"]) and all(v >= 0 for v in record["metrics"].values())
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 48


@pytest.mark.parametrize("args, says", [
    (["--top_p", "1.5"], "top_p"), (["--top_k", "0"], "top_k"), (["--temperature", "-1"], "temperature"),
    (["--beams", "0"], "beams"),
])
def test_bad_decoding_settings_are_one_sentence(cli, coca_run, tmp_path, args, says):
    root, _ = coca_run
    result = cli("caption", "--checkpoint", str(root / "last.ckpt"), "--shards", str(root / "data"), *args,
                 "--out", "caps.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and says in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "caps.jsonl").exists()


def test_a_model_without_a_decoder_cannot_caption(cli, trained, coca_run, tmp_path):
    ckpt, _ = trained
    result = cli("caption", "--checkpoint", str(ckpt), "--shards", str(coca_run[0] / "data"), "--out", "caps.jsonl",
                 cwd=tmp_path)
    assert result.returncode == 2 and "has no caption decoder" in result.stderr


def test_what_a_caption_names_of_a_scene():
    from multimodal.data.synthetic import mentions
    from multimodal.demo import _named_right

    assert mentions("Three small yellow circles") == {"colours": {"yellow"}, "shapes": {"circle"},
                                                      "counts": {"three"}}
    assert mentions("on the left a red square, on the right a blue triangle") == {
        "colours": {"red", "blue"}, "shapes": {"square", "triangle"}, "counts": set()}
    references = {"a": ["a red square to the left of a blue circle", "a blue circle on the right and a red square"],
                  "b": ["two green triangles", "there are two small green triangles"]}
    said = {"a": "a blue circle to the right of a red square", "b": "three green triangles"}
    assert _named_right(said, references) == {"colours": 1.0, "shapes": 1.0, "counts": 0.5, "all": 0.5}
