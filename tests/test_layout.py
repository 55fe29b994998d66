"""The rules of docs/design.md's layout, held: imports flow one way (torch-only modules import nothing of
ours but `distributed` and `errors`; the model layer imports no data or evaluation module, only plain
numbers from `preprocessing`; the model, data pipeline and metrics import no Lightning; the data layer sits
below evaluation; nothing imports the CLI), and every file is written through one atomic write."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "multimodal"
LIGHTNING_USERS = {"module.py", "monitor.py", "checkpoint.py", "preemption.py", "remote.py", "cli/train.py",
                   "data/datamodule.py",
                   "eval/callbacks.py"}
# the model layer: architectures, the model, its weights and what counts its FLOPs; built and loaded without
# PIL, simplejpeg or torchvision.io, the data layer's
MODEL_LAYER = {"arch.py", "model.py", "pretrained.py", "weights.py", "preprocessing.py", "throughput.py",
               "accumulate.py", "loss.py", "fsdp.py", "distributed.py"}
TORCH_ONLY = {"loss.py": {"multimodal.distributed"}, "distributed.py": set(), "optim.py": set(), "fsdp.py": set(),
              "decoding.py": {"multimodal.errors", "multimodal.errors.UserError"}}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_import_direction():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        names = imports(path)
        ours = {n for n in names if n.startswith("multimodal")}
        if rel in TORCH_ONLY:
            assert ours <= TORCH_ONLY[rel] | {"multimodal"}, (rel, ours)
        if rel not in LIGHTNING_USERS and not rel.startswith("cli/"):
            assert not any(n.startswith(("pytorch_lightning", "lightning")) for n in names), rel
        assert not any(n.startswith("lightning") for n in names), f"{rel}: use the pytorch_lightning namespace"
        if rel.startswith("data/"):  # the data layer sits below evaluation
            assert not any(n.startswith("multimodal.eval") for n in ours), rel
        if rel in MODEL_LAYER:
            assert not any(n.startswith(("multimodal.data", "multimodal.eval")) for n in ours), (rel, ours)
        if not rel.startswith("cli/") and rel != "__main__.py":
            assert not any(n.startswith("multimodal.cli") for n in names), rel
        if not rel.startswith(("cli/", "serve/")):  # the server sits on the library, under the CLI only
            assert not any(n.startswith("multimodal.serve") for n in names), rel


# What writes a file in place: a reader (or a resumed run) could see it torn. Only multimodal/files.py
# may do that, for everyone else (`atomic_file`, `write_text`, `write_json`, `save_image`).
IN_PLACE_WRITES = (r"\.write_text\(", r"\.write_bytes\(", r"os\.replace\(", r"os\.rename\(", r"shutil\.move\(",
                   r"\bopen\([^)]*[\"'][wax]b?[\"']", r"savefig\((?![^)]*\bf\b)", r"\.save\((?![^)]*\b(f|buf)\b)")


def test_every_file_is_written_through_one_atomic_write():
    import re

    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "files.py":
            continue
        text = path.read_text()
        for pattern in IN_PLACE_WRITES:
            found = re.search(pattern, text)
            assert found is None, f"{rel} writes in place ({found.group(0) if found else ''}): use multimodal.files"
