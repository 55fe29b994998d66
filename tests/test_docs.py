"""The README and docs/ name only options and metrics that exist: a renamed option or metric fails
here until the documentation follows."""

import dataclasses
import inspect
import itertools
import re

import pytest
import pytorch_lightning as pl
import torch

from multimodal.data.datamodule import ShardDataModule
from multimodal.data.synthetic import SyntheticData
from multimodal.eval.retrieval import retrieval_metrics
from multimodal.recipe import build_module
from tests.conftest import REPO

PAGES = [REPO / "README.md", REPO / "data" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXT = {page.relative_to(REPO).as_posix(): page.read_text() for page in PAGES}
SOURCE = "\n".join(p.read_text() for p in (REPO / "multimodal").rglob("*.py"))
FILE_SUFFIXES = {"py", "json", "yaml", "md", "txt", "ckpt", "safetensors", "pt", "csv", "png"}
# flags of other programs that the docs show beside ours
OTHER_PROGRAMS = {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--no-deps", "--target", "--durations",
                  "--array", "--standalone", "--nproc-per-node"}


def expand(name: str) -> list[str]:
    """`val/{image,text}_recall@{1,5}` -> the four names."""
    parts = re.split(r"\{([^{}]*)\}", name)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def mentioned(pattern: str) -> list[tuple[str, str]]:
    return sorted({(page, m.group(0)) for page, text in TEXT.items() for m in re.finditer(pattern, text)})


def test_the_docs_pages_exist_and_the_readme_is_short():
    assert len(TEXT["README.md"].splitlines()) <= 150
    for page, text in TEXT.items():
        for link in re.findall(r"\]\(([^)#]+\.md)", text):
            assert (REPO / page).parent.joinpath(link).is_file(), (page, link)


@pytest.mark.parametrize("page", TEXT)
def test_every_config_key_the_docs_name_exists(page):
    sections = {
        "model": set(inspect.signature(build_module).parameters),
        "data": set(inspect.signature(ShardDataModule.__init__).parameters),
        "trainer": set(inspect.signature(pl.Trainer.__init__).parameters),
    }
    synthetic = {f.name for f in dataclasses.fields(SyntheticData)}
    for _, key in mentioned(r"(?<![\w./-])(?:model|data|trainer)\.[a-z_]+(?:\.[a-z_]+)?"):
        section, name, *rest = key.split(".")
        if name in FILE_SUFFIXES or key not in TEXT[page]:
            continue
        assert name in sections[section], f"{page} names {key}, which {section} does not have"
        if section == "data" and name == "synthetic" and rest:
            assert rest[0] in synthetic, f"{page} names {key}"


def known_metrics() -> tuple[set[str], list[re.Pattern]]:
    literal = set(re.findall(r"[\"']((?:train|val)/[\w@/]+)[\"']", SOURCE))
    templates = [re.compile(re.sub(r"\\\{[^}]*\\\}", r"[\\w@]+", re.escape(t)) + "$")
                 for t in re.findall(r"f[\"']((?:train|val)/[^\"']*\{[^\"']*)[\"']", SOURCE) if t != "val/{key}"]
    scores = retrieval_metrics(torch.eye(3), torch.eye(3), torch.arange(3))  # validation logs these, as val/KEY
    return literal | {f"val/{key}" for key in scores}, templates


def test_every_metric_the_docs_name_is_logged_by_the_code():
    literal, templates = known_metrics()
    for page, name in mentioned(r"(?<![\w/])(?:train|val)/[\w@{},<>/]+"):
        for metric in expand(name.rstrip(",")):
            if "<" in metric:  # a placeholder such as train/bad/<kind>
                metric = metric.split("<")[0]
                assert any(known.startswith(metric) for known in literal) or any(
                    t.pattern.startswith(re.escape(metric)) for t in templates), f"{page}: {name}"
                continue
            assert metric in literal or any(t.match(metric) for t in templates), f"{page} names {metric}"


def test_every_command_option_the_docs_name_exists():
    scripts = "\n".join(p.read_text() for p in (REPO / "scripts").glob("*.py"))  # the benchmarks' options too
    ours = set(re.findall(r"[\"'](--[a-z][a-z0-9_-]*)[\"']", SOURCE + scripts))
    ours |= {"--config", "--print_config", "--help"}
    for page, flag in mentioned(r"(?<![\w-])--[a-z][a-z0-9_-]*(?![\w.])"):
        assert flag in ours or flag in OTHER_PROGRAMS, f"{page} names {flag}, which no command has"
