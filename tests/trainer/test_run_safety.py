"""Issue 11 (#2, #10): a training run is never overwritten, resumed runs stay one run, and
trainer faults are messages naming the option or file, not tracebacks. All through the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from featcache.cli import main
from featstore import open_store
from tests.helpers import DINO, build_store, tiny_run_args, write_ids
from trainer.checkpoint import read_checkpoint, save_checkpoint
from trainer.config import TrainConfig, TrainConfigError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    url = build_store(root, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    write_ids(root / "l.txt", ids[:2])
    write_ids(root / "u.txt", ids[2:4])
    write_ids(root / "v.txt", ids[4:])
    return url, root


@pytest.fixture(scope="module")
def run(store: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-iteration run (read only: tests copy it before changing anything)."""
    url, root = store
    out = tmp_path_factory.mktemp("run") / "run"
    _ok(_cli(*_train(url, root, out, "--iters", "2")))
    return out


def _train(url: str, root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--store",
        url,
        "--teacher",
        DINO,
        *tiny_run_args(root),
        "--log-interval",
        "1",
        "--eval-interval",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def _cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _ok(res: Result) -> Result:
    assert res.exit_code == 0, res.output
    return res


def _refused(res: Result, *phrases: str) -> str:
    """Exit 1 with a message (click's SystemExit, no traceback) holding every phrase."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    for phrase in phrases:
        assert phrase in res.output, (phrase, res.output)
    return res.output


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _csv_steps(out: Path) -> list[int]:
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    return [int(r.split(",")[0]) for r in rows]


def _eval_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- #2 an existing run


def test_train_into_an_existing_run_is_refused_and_leaves_it_intact(
    store: tuple[str, Path], run: Path, tmp_path: Path
) -> None:
    url, root = store
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = _digests(out)
    _refused(
        _cli(*_train(url, root, out, "--iters", "2")),
        f"--out {out} already holds a training run",
        "--resume auto",
        "a new --out",
        "--overwrite",
    )
    assert _digests(out) == before


def test_overwrite_replaces_the_run_and_its_logs(
    store: tuple[str, Path], run: Path, tmp_path: Path
) -> None:
    url, root = store
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "tb" / "old.marker").write_text("from the first run")
    _ok(_cli(*_train(url, root, out, "--iters", "1", "--overwrite")))
    # one run only: its single step, no rows or events of the replaced 2-step run
    assert _csv_steps(out) == [1] and _eval_steps(out) == [1]
    assert not (out / "tb" / "old.marker").exists()
    assert read_checkpoint(out / "latest.pt")["run"]["step"] == 1


def test_overwrite_deletes_only_a_featcache_run(
    store: tuple[str, Path], run: Path, tmp_path: Path
) -> None:
    url, root = store
    mixed = tmp_path / "mixed"  # a run folder the user also keeps notes in
    shutil.copytree(run, mixed)
    (mixed / "notes.txt").write_text("mine")
    foreign = tmp_path / "foreign"  # run-like names, but nothing featcache can read
    foreign.mkdir()
    (foreign / "config.yaml").write_text("just: some yaml\n")
    (foreign / "metrics.csv").write_text("a,b\n1,2\n")
    for folder, phrase in (
        (mixed, "holds files a training run does not write (notes.txt)"),
        (foreign, "is not recognisably a training run"),
    ):
        before = _digests(folder)
        _refused(
            _cli(*_train(url, root, folder, "--iters", "1", "--overwrite")),
            f"--overwrite: {folder} ",
            phrase,
            "nothing was deleted",
        )
        assert _digests(folder) == before


def test_out_that_is_a_file_is_refused(store: tuple[str, Path], tmp_path: Path) -> None:
    url, root = store
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    _refused(
        _cli(*_train(url, root, target, "--iters", "1")),
        f"--out {target} is a file",
        "pass a folder",
    )
    assert target.read_text() == "keep me"
    _refused(
        _cli(*_train(url, root, tmp_path, "--iters", "1", "--overwrite", "--resume", "auto")),
        "--resume and --overwrite contradict",
    )


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--lr", "0.001", "--lr (optim.lr) was 5e-06 and is now 0.001"),
        ("--seed", "3", "--seed (runtime.seed) was 0 and is now 3"),
        ("--batch", "2+1", "--batch (schedule.batch_unlabeled) was 2 and is now 1"),
    ],
)
def test_resume_with_another_lr_batch_or_seed_is_refused(
    store: tuple[str, Path], run: Path, tmp_path: Path, option: str, value: str, says: str
) -> None:
    url, root = store
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = _digests(out)
    _refused(
        _cli(*_train(url, root, out, "--iters", "3", "--resume", "auto", option, value)),
        says,
        "new --out",
    )
    assert _digests(out) == before


def test_resume_after_a_kill_logs_each_step_once(store: tuple[str, Path], tmp_path: Path) -> None:
    """A kill after step 3 was logged but before its checkpoint: resuming redoes step 3."""
    url, root = store
    out = tmp_path / "run"
    _ok(_cli(*_train(url, root, out, "--iters", "4", "--stop-after", "2")))
    at_step_2 = (out / "latest.pt").read_bytes()
    _ok(_cli(*_train(url, root, out, "--iters", "4", "--stop-after", "3", "--resume", "auto")))
    assert _csv_steps(out) == [1, 2, 3] and _eval_steps(out) == [1, 2, 3]
    (out / "latest.pt").write_bytes(at_step_2)  # the checkpoint of step 3 never happened
    _ok(_cli(*_train(url, root, out, "--iters", "4", "--resume", "auto")))
    assert _csv_steps(out) == [1, 2, 3, 4]
    assert _eval_steps(out) == [1, 2, 3, 4]


# ---------------------------------------------------------------- #10 trainer faults


def test_device_cuda_without_a_gpu_is_a_message(
    store: tuple[str, Path], run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only host
    url, root = store
    args = [a if a != "cpu" else "cuda" for a in _train(url, root, tmp_path / "r", "--iters", "1")]
    says = ("--device cuda: no CUDA GPU is available", "--device cpu")
    _refused(_cli(*args), *says)
    assert not (tmp_path / "r").exists()
    _refused(
        _cli("evaluate", run / "latest.pt", "--store", url, "--device", "cuda", "--no-progress"),
        *says,
    )
    _refused(
        _cli(
            "predict",
            run / "latest.pt",
            root / "syn" / "images",
            "--out",
            tmp_path / "p",
            "--device",
            "cuda",
            "--no-progress",
        ),
        *says,
    )
    _refused(
        _cli("evaluate", run / "latest.pt", "--store", url, "--device", "gpu"),
        "--device gpu: not a device name",
    )


def test_workers_minus_one_is_a_message(store: tuple[str, Path], tmp_path: Path) -> None:
    url, root = store
    args = _train(url, root, tmp_path / "r", "--iters", "1")
    args[args.index("--workers") + 1] = "-1"
    _refused(_cli(*args), "--workers -1: must be 0 or more")


def test_yaml_numbers_read_as_strings_are_coerced_by_field_type(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads 1e-3 and 5e3 as strings: no dot before the exponent
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "optim:\n  lr: 1e-3\nschedule:\n  iters: 5e3\n"
        "data:\n  store: s.zarr\n  scale_range: [0.5, '2']\n"
    )
    cfg = TrainConfig.load(path)
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.iters == 5000 and isinstance(cfg.schedule.iters, int)
    assert cfg.data.scale_range == (0.5, 2.0)
    for text, says in (
        ("optim:\n  lr: fast\n", "optim.lr = 'fast' is not a finite number"),
        ("schedule:\n  iters: 2.5\n", "schedule.iters = 2.5 is not a whole"),
        ("model:\n  tiny: 'maybe'\n", "model.tiny = 'maybe' is not true or false"),
        ("runtime:\n  seed: true\n", "runtime.seed = True is not a whole"),
        ("optim:\n  lr:\n", "config key optim.lr is empty"),
        ("optim: 3\n", "config key optim = 3 must be a section of keys"),
        ("model:\n  teachers:\n  - branch: full\n", "model.teachers[0]: TeacherConfig"),
    ):
        path.write_text(text)
        with pytest.raises(TrainConfigError, match=f"config {path}: ") as info:
            TrainConfig.load(path)
        assert says in str(info.value)
    path.write_text("optim:\n  lr:\n")
    _refused(_cli("train", "--config", path, "--store", "s.zarr"), "optim.lr is empty")


def _edited(run: Path, tmp_path: Path, edit: str) -> Path:
    ckpt = read_checkpoint(run / "latest.pt")
    ckpt.pop("format")
    if edit == "unknown key":
        ckpt["student_config"] = {**ckpt["student_config"], "wings": 2}
    else:
        ckpt.pop("ema")
    out = tmp_path / "run"
    shutil.copytree(run, out)
    save_checkpoint(out / "latest.pt", ckpt)
    return out


@pytest.mark.parametrize("edit", ["unknown key", "no ema"])
def test_edited_checkpoint_is_a_message_everywhere(
    store: tuple[str, Path], run: Path, tmp_path: Path, edit: str
) -> None:
    url, root = store
    out = _edited(run, tmp_path, edit)
    ckpt = out / "latest.pt"
    says = (
        f"checkpoint {ckpt}: student_config has field(s) ['wings']"
        if edit == "unknown key"
        else f"checkpoint {ckpt} holds no 'ema' weights (--use ema)"
    )
    _refused(_cli("evaluate", ckpt, "--store", url, "--use", "ema", "--no-progress"), says)
    images = root / "syn" / "images"
    _refused(
        _cli("predict", ckpt, images, "--out", tmp_path / "p", "--use", "ema", "--no-progress"),
        says,
    )
    _refused(_cli("export", ckpt, tmp_path / "m.safetensors", "--use", "ema"), says)
    if edit == "no ema":
        says = f"checkpoint {ckpt} has no 'ema' section(s), which it needs to resume a run"
    _refused(_cli(*_train(url, root, out, "--iters", "3", "--resume", "auto")), says)


def test_truncate_logs_drops_later_and_torn_rows(tmp_path: Path) -> None:
    from trainer.logging_utils import truncate_logs

    (tmp_path / "metrics.csv").write_text("step,loss\r\n1,0.5\r\n2,0.4\r\n3,0.3\r\n4,0.2\r\n5,0.")
    (tmp_path / "eval.jsonl").write_text('{"step": 2}\n{"step": 4}\n{"step": 3')
    truncate_logs(tmp_path, 3)
    # bytes: kept rows keep the csv module's \r\n endings
    assert (tmp_path / "metrics.csv").read_bytes() == b"step,loss\r\n1,0.5\r\n2,0.4\r\n3,0.3\r\n"
    assert (tmp_path / "eval.jsonl").read_text() == '{"step": 2}\n'
    truncate_logs(tmp_path, 0)  # a fresh start in the folder: no rows of the old run are kept
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "eval.jsonl").exists()


def test_a_new_run_failing_before_its_first_checkpoint_leaves_no_folder(
    store: tuple[str, Path], run: Path, tmp_path: Path
) -> None:
    from tests.helpers import tiny_config
    from trainer.config import TeacherConfig
    from trainer.engine import Trainer
    from trainer.losses import NonFiniteLossError

    url, _ = store
    ids = [t.tile_id for t in open_store(url).tiles]

    def poisoned(cfg: TrainConfig) -> Trainer:
        trainer = Trainer(cfg)
        with torch.no_grad():
            for p in trainer.model.head.parameters():
                p.fill_(float("nan"))
        return trainer

    cfg = tiny_config(tmp_path, url, ids, [TeacherConfig(DINO)], iters=2)
    with pytest.raises(NonFiniteLossError):
        poisoned(cfg).run()
    assert not (tmp_path / "run").exists()  # config.yaml and logs were removed with it
    # a resumed run that fails keeps its folder, byte for byte up to the truncated logs
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    cfg.runtime.out_dir, cfg.runtime.resume, cfg.schedule.iters = str(resumed), "auto", 3
    cfg.schedule.log_interval, cfg.schedule.eval_interval = 1, 1
    before = _digests(resumed)
    with pytest.raises(NonFiniteLossError):
        poisoned(cfg).run()
    assert {k: v for k, v in _digests(resumed).items() if k.endswith(".pt")} == {
        k: v for k, v in before.items() if k.endswith(".pt")
    }
