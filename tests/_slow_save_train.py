"""teacher_train.py whose every torch.save takes 3 s more (a large model, a network file system): the
torchrun entry of tests/test_cuda_paths.py's SIGTERM test."""
import runpy
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
_real_save = torch.save


def _slow_save(*args, **kwargs):
    time.sleep(3.0)
    return _real_save(*args, **kwargs)


torch.save = _slow_save
sys.argv[0] = str(REPO / "teacher_train.py")
runpy.run_path(str(REPO / "teacher_train.py"), run_name="__main__")
