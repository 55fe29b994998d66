"""W&B (offline) and MLflow (a file store) as loggers of `multimodal train`: each run its own id derived from
its run folder, a resumed run continuing the same W&B / MLflow run, the resolved config as the run's
parameters, and the logged curves there with their steps. What each recorded is read back from its own files:
W&B's transaction log (run-ID.wandb) and MLflow's store."""

import struct
from pathlib import Path

import pytest

from multimodal.errors import UserError
from multimodal.loggers import check_installed, wandb_id
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow  # minutes of CLI runs: scheduled first (tests/conftest.py), left out of test-fast

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

DEBUG = str(REPO / "configs" / "debug.yaml")
RUN = Path("runs") / "debug" / "version_0"
LOGGERS = """
trainer:
  logger:
    - class_path: pytorch_lightning.loggers.CSVLogger
      init_args: {{save_dir: runs, name: debug}}
    - class_path: pytorch_lightning.loggers.WandbLogger
      init_args: {{project: tests}}
    - class_path: pytorch_lightning.loggers.MLFlowLogger
      init_args: {{experiment_name: tests, tracking_uri: "file:{store}"}}
"""


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log: a 7-byte header (":W&B", magic, version), then LevelDB's
    log format, 32 KiB blocks of chunks (crc 4, length 2, type 1: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pending, pos, block = path.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run(path: Path) -> dict:
    """Run id, config keys and the (global step, train/loss) series of one .wandb file."""
    import json

    run_id, config, series = None, {}, []
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                series.append((int(items["trainer/global_step"]), items["train/loss"]))
    return {"id": run_id, "config": config, "series": series}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """A run with CSV, W&B and MLflow loggers: 4 steps, then resumed to 8."""
    root = tmp_path_factory.mktemp("loggers")
    (root / "loggers.yaml").write_text(LOGGERS.format(store=root / "mlruns"))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
           "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data"),
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    common = ["--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false"]
    first = run_cli("train", "--config", DEBUG, "--config", str(root / "loggers.yaml"), "--trainer.max_steps", "4",
                    *common, cwd=root, env=env, memory=16 << 30)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli("train", "--config", str(root / RUN / "config.yaml"), "--resume", str(RUN),
                     "--trainer.max_steps", "8", *common, cwd=root, env=env, memory=16 << 30)
    assert second.returncode == 0, second.stderr[-3000:]
    return root


def test_wandb_keeps_one_run_per_folder_with_the_config_and_the_curve(resumed):
    logs = sorted((resumed / RUN / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2  # the first start and the resumed one
    first, second = wandb_run(logs[0]), wandb_run(logs[1])
    assert first["id"] == second["id"] == wandb_id(resumed / RUN)  # the same W&B run, continued
    assert first["config"]["model.lr"] == "0.001" and first["config"]["data.batch_size"] == "32"
    assert "resume" not in first["config"]  # how a run is continued is not a setting of it
    assert [step for step, _ in first["series"]] == [1, 3]
    steps = [step for step, _ in second["series"]]
    assert steps[-2:] == [5, 7] and set(steps) <= {3, 5, 7}  # on from the checkpoint (its row, step 3, re-logged)


def test_mlflow_continues_its_run_with_the_config_and_the_curve(resumed, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it to read a file store

    run_id = (resumed / RUN / "mlflow_run_id").read_text().strip()
    client = MlflowClient(f"file:{resumed / 'mlruns'}")
    experiment = client.get_experiment_by_name("tests")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]  # one run
    run = client.get_run(run_id)
    assert run.data.params["model.lr"] == "0.001" and run.data.params["trainer.max_steps"] == "4"
    assert run.data.tags["multimodal.run_folder"] == str((resumed / RUN).resolve())
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(set(steps)) == [1, 3, 5, 7]  # both starts' points in one run


def test_two_folders_two_ids_and_a_missing_package_is_one_sentence(tmp_path, monkeypatch):
    assert wandb_id(tmp_path / "debug" / "version_0") != wandb_id(tmp_path / "debug" / "version_1")
    assert wandb_id(tmp_path / "debug" / "version_0") == wandb_id(tmp_path / "debug" / "version_0")
    import multimodal.loggers as loggers

    monkeypatch.setitem(loggers.NEEDS, "WandbLogger", ("no_such_module_here", "wandb"))
    entry = type("Entry", (), {"class_path": "pytorch_lightning.loggers.WandbLogger"})()
    with pytest.raises(UserError, match="needs the wandb package: pip install wandb"):
        check_installed([entry])


def test_resume_auto_continues_a_run_with_trackers(resumed):
    """config.yaml holds the settings as given, not the ids filled in: the same command line is the same config."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(resumed / "wandb-config"),
           "WANDB_CACHE_DIR": str(resumed / "wandb-cache"), "WANDB_DATA_DIR": str(resumed / "wandb-data"),
           "MLFLOW_ALLOW_FILE_STORE": "true"}
    again = run_cli("train", "--config", DEBUG, "--config", str(resumed / "loggers.yaml"), "--trainer.max_steps", "8",
                    "--trainer.log_every_n_steps", "2", "--trainer.enable_progress_bar", "false", "--resume", "auto",
                    cwd=resumed, env=env, memory=16 << 30)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"continuing {(resumed / RUN).resolve()}" in again.stderr or f"continuing {resumed / RUN}" in again.stderr
    saved = (resumed / RUN / "config.yaml").read_text()
    assert wandb_id(resumed / RUN) not in saved and "multimodal.run_folder" not in saved
