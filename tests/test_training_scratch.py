"""Where a Ray Train worker's temp files go, and what must stay out of there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_LOAD = """
import sys, tempfile, torch
from multiprocessing import util
from torch.utils.data import DataLoader
from lakevision.training.ray_trainer import use_scratch_dir
use_scratch_dir(sys.argv[1], sys.argv[2])
assert tempfile.gettempdir() == sys.argv[1], tempfile.gettempdir()
assert util.get_temp_dir().startswith(sys.argv[2] + "/pymp-"), util.get_temp_dir()
print(sum(len(b) for b in DataLoader([torch.zeros(32, 32)] * 6, batch_size=2, num_workers=1)))
"""


def test_a_deep_scratch_dir_keeps_dataloader_workers_working(tmp_path):
    # a run's storage can be deep (the demo's checkpoints folder): the loader's sockets must not go there
    scratch = tmp_path / ("run-" + "a" * 60) / ("detection-" + "b" * 40 + ".scratch")
    assert len(str(scratch)) > 108
    # the short folder the driver makes for the workers' multiprocessing sockets (tmp_path is too deep)
    mp_dir = Path(tempfile.mkdtemp(prefix="mp-"))
    try:
        proc = subprocess.run([sys.executable, "-c", _LOAD, str(scratch), str(mp_dir)], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == ["6"]
        assert scratch.is_dir()
    finally:
        shutil.rmtree(mp_dir)
