"""Hostile or careless settings of models and decoding (issue 22): what a model config or the decoding settings
would cost is estimated and refused before anything is built or decoded; odd numbers are refused or have a
stated meaning; a full disk is one sentence and leaves the previous captions whole; a run that captions nothing
fails. Each answer is one sentence, exit status 2, no traceback."""

import json

import open_clip
import pytest
import torch
from PIL import Image

from multimodal import arch
from multimodal.decoding import Decoding, sample_next
from multimodal.errors import UserError
from tests.conftest import run_cli
from tests.test_pretrained import seed


@pytest.fixture(scope="session")
def coca_ckpt(tmp_path_factory):
    """An untrained tiny-coca checkpoint as `multimodal train` writes one (its state dict and hyper-parameters):
    nothing here needs captions that mean anything, so it skips test_coca's training steps."""
    from multimodal.recipe import build_module

    path = tmp_path_factory.mktemp("coca") / "coca.ckpt"
    module = build_module("tiny-coca", loss="coca")
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def images(folder, count: int = 2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"{i:03d}.png")
    return folder


def one_sentence(result) -> str:
    """The error line of a refused command (after any warnings about skipped images)."""
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and line.endswith("."), line
    return line


FAST = ["--num_workers", "0", "--strategy", "greedy", "--max_length", "3"]


# 1. Resources bounded before work starts

def test_beams_that_cannot_fit_are_refused_before_decoding(coca_ckpt, tmp_path):
    """Before: `--beams 100000` asked for 79 GB in the first step (a traceback; killed where it was granted)."""
    images(tmp_path / "imgs")
    result = run_cli("caption", "--checkpoint", str(coca_ckpt), "--images", "imgs", "--out", "caps.jsonl",
                     "--num_workers", "0", "--beams", "100000", cwd=tmp_path, timeout=120)
    line = one_sentence(result)
    assert "--beams 100000" in line and "GiB of next-token logits" in line and "lower --beams" in line, line
    assert not (tmp_path / "caps.jsonl").exists() and not (tmp_path / "caps.jsonl.parts").exists()


def test_a_decoding_estimate_counts_sequences_positions_and_the_vocabulary():
    """Peaks measured on tiny-coca with 19 tokens (the growth of ru_maxrss): 182 MiB for 8 images x 4 beams,
    653 MiB for 8 x 16 beams, 234 MiB for 64 images greedy; estimated 169, 676 and 338 MiB."""
    beam, greedy = Decoding("beam", max_length=19, beams=16), Decoding("greedy", max_length=19, beams=16)
    assert beam.peak_bytes(8, 49408) == 8 * 16 * 28 * 49408 * 4  # 28 positions: 19 + the prompt + 8 rows
    assert greedy.peak_bytes(64, 49408) == 64 * 28 * 49408 * 4  # one sequence an image: beams unused


def hub_config(**changes) -> dict:
    """tiny's open_clip_config.json, with `changes` ("text_cfg.layers": value) made."""
    config = {"model_cfg": arch.load("tiny").config, "preprocess_cfg": {}}
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[last] = value
    return config


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding hostile open_clip repositories (each with a weights file, so that
    the code before this issue went on to build them)."""
    cache = tmp_path_factory.mktemp("hub") / "hub"
    repos = {
        "deep": hub_config(**{"model_cfg.text_cfg.width": 1024, "model_cfg.text_cfg.layers": 10**4}),
        "wide": hub_config(**{"model_cfg.vision_cfg.width": 10**6}),
        "string": hub_config(**{"model_cfg.text_cfg.layers": "12"}),
        "negative": hub_config(**{"model_cfg.vision_cfg.layers": -3}),
        "list": hub_config(**{"model_cfg.text_cfg.width": [128]}),
        "null": hub_config(**{"model_cfg.embed_dim": None}),
        "huge": hub_config(**{"model_cfg.text_cfg.context_length": 10**400}),
        "typo": hub_config(**{"model_cfg.vision_cfg.widht": 128}),
        "mean": hub_config(**{"preprocess_cfg.mean": "grey"}),
        "heads": hub_config(**{"model_cfg.text_cfg.heads": 3}),
    }
    for name, config in repos.items():
        seed(cache, f"hostile/{name}", {"open_clip_config.json": json.dumps(config).encode(),
                                        "open_clip_model.safetensors": b"not built before this is read"})
    return cache


def test_an_enormous_hub_model_is_refused_before_it_is_built(hub, tmp_path):
    """Before: width 1024 with 10^4 layers was killed at the suite's 4 GB."""
    result = run_cli("export", "--model", "hf-hub:hostile/deep", "--cache_dir", str(hub), "--out", "m.safetensors",
                     cwd=tmp_path, timeout=120)
    line = one_sentence(result)
    assert "hf-hub:hostile/deep's open_clip_config.json describes a model of about 125,880 million parameters" \
        in line and "more than the 4.0 GiB that this process's ulimit allows" in line, line
    assert "MULTIMODAL_MEMORY_LIMIT" in line and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("repo, says", [
    ("wide", "describes a model of about 24,000,392 million parameters"),  # before: a traceback
    ("string", 'model_cfg.text_cfg.layers is "12" where a whole number belongs'),
    ("negative", "model_cfg.vision_cfg.layers is -3, which is no size"),
    ("list", "model_cfg.text_cfg.width is [128] where a whole number belongs"),
    ("null", "model_cfg.embed_dim is null where a whole number belongs"),
    ("huge", "model_cfg.text_cfg.context_length is 1000000000000000000000000000000000000000, which is no size"),
    ("typo", f"model_cfg.vision_cfg.widht is not a setting open_clip {open_clip.__version__} knows (did you mean "
             "width?)"),
    ("mean", 'preprocess_cfg.mean is "grey" where a list of finite numbers belongs'),
    ("heads", "open_clip cannot build hf-hub:hostile/heads from its config"),
])
def test_a_hub_config_of_the_wrong_types_or_sizes_is_one_sentence(cli, hub, tmp_path, repo, says):
    result = cli("export", "--model", f"hf-hub:hostile/{repo}", "--cache_dir", str(hub), "--out", "m.safetensors",
                 cwd=tmp_path)
    line = one_sentence(result)
    assert says in line, line
    assert result.stderr.count("\n") == 1 and not (tmp_path / "m.safetensors").exists()


def test_a_model_json_is_checked_as_a_hub_config_is(cli, tmp_path):
    (tmp_path / "wide.json").write_text(json.dumps(hub_config(**{"model_cfg.vision_cfg.width": 10**6})["model_cfg"]))
    (tmp_path / "w.safetensors").write_bytes(b"never read")
    result = cli("export", "--model", "wide.json", "--pretrained", "w.safetensors", "--out", "m.safetensors",
                 cwd=tmp_path)
    assert "Model config file wide.json describes a model of about 24,000,392 million parameters" \
        in one_sentence(result)
    (tmp_path / "half.json").write_text('{"embed_dim": 64, "vision_cfg": {')
    result = cli("export", "--model", "half.json", "--pretrained", "w.safetensors", "--out", "m.safetensors",
                 cwd=tmp_path)
    assert "half.json is not valid JSON" in one_sentence(result)


def test_the_memory_limit_is_the_users_to_set(tmp_path, monkeypatch):
    """MULTIMODAL_MEMORY_LIMIT lowers or raises the limit; a value that is no amount is one sentence."""
    config = tmp_path / "small.json"
    config.write_text(json.dumps(arch.load("tiny").config))
    monkeypatch.setenv("MULTIMODAL_MEMORY_LIMIT", "1M")
    with pytest.raises(UserError, match=r"more than the 1\.0 MiB that MULTIMODAL_MEMORY_LIMIT allows"):
        arch.load(str(config))
    monkeypatch.setenv("MULTIMODAL_MEMORY_LIMIT", "lots")
    with pytest.raises(UserError, match="MULTIMODAL_MEMORY_LIMIT=lots is not an amount of memory"):
        arch.load(str(config))
    monkeypatch.setenv("MULTIMODAL_MEMORY_LIMIT", "2G")
    assert arch.memory_limit() == (2 << 30, "that MULTIMODAL_MEMORY_LIMIT allows")
    assert arch.load(str(config)).embed_dim == arch.load("tiny").embed_dim


def test_every_open_clip_config_passes_and_counts_within_two_percent(monkeypatch):
    """The checks refuse none of open_clip's own architectures (given the memory), and the estimate of their
    size is within 2% of the parameters and buffers they build (on the meta device)."""
    monkeypatch.setenv("MULTIMODAL_MEMORY_LIMIT", "1000T")
    for name in open_clip.list_models():
        arch.check_config(open_clip.get_model_config(name), name)
    monkeypatch.delenv("MULTIMODAL_MEMORY_LIMIT")
    for name in ("ViT-B-32", "RN50", "coca_ViT-B-32", "tiny-coca"):
        architecture = arch.load(name)
        with torch.device("meta"):
            towers = architecture.create_towers(device="meta")
        built = sum(t.numel() for t in (*towers.parameters(), *towers.buffers()))
        assert abs(arch.parameter_count(architecture.config) / built - 1) < 0.02, name


# 2. Odd but parseable numbers: refused in one sentence, or their stated meaning

@pytest.mark.parametrize("args, says", [
    (["--length_penalty", "nan"], "--length_penalty nan is not a number within +-10"),  # before: accepted
    (["--length_penalty", "inf"], "--length_penalty inf is not a number within +-10"),
    (["--length_penalty", "1e308"], "--length_penalty 1e+308 is not a number within +-10"),
    (["--temperature", "nan"], "--temperature nan is not 0 or a positive finite number"),
    (["--temperature", "inf"], "--temperature inf is not 0 or a positive finite number"),
    (["--seed", str(10**23)], f"--seed {10**23} is outside 0 to 4294967295"),  # before: a traceback
    (["--seed", "-1"], "--seed -1 is outside 0 to 4294967295"),
    (["--top_p", "nan"], "--top_p nan is outside (0, 1]"),
    (["--top_p", "0"], "--top_p 0.0 is outside (0, 1]"),
    (["--top_k", "-5"], "--top_k -5 is below 1"),
    (["--beams", "-1"], "--beams -1 is below 1"),
    (["--max_length", "0"], "--max_length 0 is below 1"),
    (["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
    (["--part_size", "-3"], "--part_size must be a positive integer, got -3"),
])
def test_odd_decoding_numbers_are_one_sentence(cli, coca_ckpt, tmp_path, args, says):
    images(tmp_path / "imgs", 1)
    result = cli("caption", "--checkpoint", str(coca_ckpt), "--images", "imgs", "--out", "caps.jsonl",
                 "--num_workers", "0", "--max_length", "3", *args, cwd=tmp_path)
    line = one_sentence(result)
    assert says in line, line
    assert not (tmp_path / "caps.jsonl").exists() and not (tmp_path / "caps.jsonl.parts").exists()


def test_extreme_numbers_with_a_meaning_caption(cli, coca_ckpt, tmp_path):
    """A temperature of 1e-40 samples the most likely tokens (before: a traceback from the sampler), top_k beyond
    the vocabulary keeps all of it, max_length beyond the model's context stops there."""
    images(tmp_path / "imgs", 1)
    result = cli("caption", "--checkpoint", str(coca_ckpt), "--images", "imgs", "--out", "caps.jsonl",
                 "--num_workers", "0", "--strategy", "top_k", "--temperature", "1e-40", "--top_k", str(10**12),
                 "--max_length", str(10**9), "--seed", str(2**32 - 1), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "caps.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and isinstance(rows[0]["caption"], str)


@pytest.mark.parametrize("temperature", [1e-40, 1e-320, 5e-324])
def test_a_vanishing_temperature_draws_the_most_likely_token(temperature):
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 10
    for strategy in ("top_k", "top_p"):
        drawn = sample_next(logits, Decoding(strategy, temperature=temperature), torch.Generator().manual_seed(1))
        assert torch.equal(drawn, logits.argmax(-1)), strategy


@pytest.mark.parametrize("args, says", [
    (["--seed", str(10**23)], f"--seed {10**23} is outside 0 to 4294967295"),  # before: a traceback after embedding
    (["--lr", "nan"], "--lr must be a positive finite number"),
    (["--lr", "inf"], "--lr must be a positive finite number"),
    (["--fewshot_k", "-2"], "--fewshot_k -2 is no number of images a class"),
])
def test_odd_probe_numbers_are_one_sentence(cli, coca_ckpt, tmp_path, args, says):
    for split in ("train", "test"):
        for label in ("a", "b"):
            images(tmp_path / split / label, 2)
    result = cli("eval", "linear_probe", "--checkpoint", str(coca_ckpt), "--images", "test", "--train_images",
                 "train", "--num_workers", "0", "--out", "r.json", *args, cwd=tmp_path)
    assert says in one_sentence(result)
    assert not (tmp_path / "r.json").exists()


# 3. A failed write is one sentence and leaves nothing half-written

def fill(folder, room: int) -> None:
    """Fill the file system of `folder` until only about `room` bytes are left."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:  # full
            pass
    with open(folder / "filler", "r+b") as f:
        f.truncate(max(0, f.seek(0, 2) - room))


def test_captions_on_a_full_disk_are_one_sentence_and_nothing_torn(cli, coca_ckpt, small_disk, tmp_path):
    """Before: `No space left on device` as a traceback. The disk has room for the parts of a first run but not
    for the captions of the next images: the out file is absent, or the previous one whole."""
    images(tmp_path / "imgs", 3)
    common = ["caption", "--checkpoint", str(coca_ckpt), "--images", str(tmp_path / "imgs"), *FAST]
    fill(small_disk, 4096)
    result = cli(*common, "--out", "first.jsonl", "--grid", "first.png", cwd=small_disk)
    line = one_sentence(result)
    assert "cannot be written (No space left on device)" in line and "first.jsonl" in line, line
    assert not (small_disk / "first.jsonl").exists() and not (small_disk / "first.png").exists()
    assert not list(small_disk.rglob("*.partial"))

    (small_disk / "filler").unlink()
    assert cli(*common, "--out", "caps.jsonl", cwd=small_disk).returncode == 0
    before = (small_disk / "caps.jsonl").read_bytes()
    fill(small_disk, 0)
    for again in ([], ["--overwrite", "--seed", "7"]):  # the same parts joined again; other settings, redone
        result = cli(*common, "--out", "caps.jsonl", *again, cwd=small_disk)
        assert "caps.jsonl cannot be written (No space left on device)" in one_sentence(result)
        assert (small_disk / "caps.jsonl").read_bytes() == before
        assert not list(small_disk.rglob("*.partial"))


# 4. Success means work was done

@pytest.mark.parametrize("grid", [[], ["--grid", "sheet.png"]])
def test_captioning_no_readable_image_fails(cli, coca_ckpt, tmp_path, grid):
    """Before: exit 0, `Wrote 0 captions`, an empty captions file."""
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"not an image")
    common = ["caption", "--checkpoint", str(coca_ckpt), "--images", "bad", "--out", "caps.jsonl", *FAST, *grid]
    for _ in range(2):  # a rerun does not take the first run's empty parts for done work
        line = one_sentence(cli(*common, cwd=tmp_path))
        assert "No image of bad could be read, so no caption was written" in line, line
        assert not (tmp_path / "caps.jsonl").exists() and not (tmp_path / "sheet.png").exists()
        assert not (tmp_path / "caps.jsonl.parts").exists()


def test_a_resumed_run_draws_its_grid_from_the_captions_written(cli, coca_ckpt, tmp_path):
    """Before: a rerun with every part done wrote no --grid, and said so, with exit 0."""
    images(tmp_path / "imgs", 2)
    common = ["caption", "--checkpoint", str(coca_ckpt), "--images", "imgs", "--out", "caps.jsonl", *FAST]
    assert cli(*common, cwd=tmp_path).returncode == 0
    result = cli(*common, "--grid", "sheet.png", cwd=tmp_path)
    assert result.returncode == 0 and "1 of 1 parts already done; captioning 0." in result.stdout
    assert Image.open(tmp_path / "sheet.png").size[0] > 0
    assert len((tmp_path / "caps.jsonl").read_text().splitlines()) == 2
