"""One rank of a multi-process search, for tests/test_distributed.py (launched with the env vars
torchrun sets: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    python distributed_worker.py ROOT JOBS_JSON

Each job is [action, run_dir, steps, stop]: "run" runs (or continues from run_dir's checkpoint) to
the end; "partial" runs `stop` steps, checkpoints and returns. Prints one JSON line: this rank and
every path under ROOT it opened for writing, renamed, created or removed (an audit hook).
"""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
ROOT = sys.argv[1]
WRITES: list[str] = []


def audit(event: str, args: tuple) -> None:
    if event == "open" and isinstance(args[0], str) and isinstance(args[1], str) and set(args[1]) & set("wax+"):
        WRITES.append(args[0])
    elif event == "os.rename":  # also os.replace
        WRITES.extend([str(args[0]), str(args[1])])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        WRITES.append(str(args[0]))


sys.addaudithook(audit)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)
dist.init_process_group("gloo")

from test_distributed import make_search  # noqa: E402

for action, run_dir, steps, stop in json.loads(sys.argv[2]):
    run = make_search(run_dir, steps)
    run.load_checkpoint()
    if action == "partial":
        for _ in range(stop - run.step):
            run.history.append("steps", run.do_step())
        run.checkpoint()
    else:
        run.run()
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(),
                  "writes": sorted({w for w in WRITES if os.path.abspath(w).startswith(ROOT)})}), flush=True)
dist.destroy_process_group()
