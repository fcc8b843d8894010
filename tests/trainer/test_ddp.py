"""DDP smoke run: two CPU processes (gloo) through torchrun and the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from featstore import open_store
from tests.helpers import DINO, build_store, write_ids

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    url = build_store(tmp_path, teachers=(DINO,))
    ids = [t.tile_id for t in open_store(url).tiles]
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "featcache.cli",
        "train",
        "--store",
        url,
        "--teacher",
        DINO,
        "--tiny",
        "--crop",
        "70",
        "--iters",
        "2",
        "--batch",
        "1+1",
        "--labeled",
        write_ids(tmp_path / "l.txt", ids[:2]),
        "--unlabeled",
        write_ids(tmp_path / "u.txt", ids[2:4]),
        "--val",
        write_ids(tmp_path / "v.txt", ids[4:]),
        "--eval-interval",
        "2",
        "--log-interval",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"step": 2') == 1  # only rank 0 reports
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # rank 0 logs once per step
    ckpt = torch.load(out / "latest.pt", map_location="cpu", weights_only=True)
    assert ckpt["run"]["step"] == 2
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    # each rank evaluated one val tile; the all-reduced matrix counts both
    assert evals[-1]["ema"]["pixels"] == 2 * 64 * 64
    assert not any(k.startswith("module.") for k in ckpt["student"])
