"""Running test code in fresh processes: one child (fresh-interpreter checks) or two (accelerate, gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parents[1]
# the checkout's own package first, whatever copy is installed
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}


def run_child(module: str, *args: str) -> dict[str, Any]:
    """``python -m module args`` in a fresh interpreter; the JSON object it printed last."""
    run = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(*target: str, timeout: int = 900) -> None:
    """``accelerate launch --multi_gpu --num_processes 2 TARGET``: with no GPU each process reports MULTI_CPU (gloo).

    (``--cpu --num_processes 2`` would silently start one process in accelerate 1.15.)
    """
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *target,
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
