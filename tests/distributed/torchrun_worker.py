"""Entry point for tests/distributed/test_launchers.py: run under torchrun, write one JSON per rank."""

import json
import sys
from pathlib import Path

from tests.distributed.test_launchers import _init_and_all_reduce

if __name__ == "__main__":
    import os

    from atropos_megatron.trainer import parallel

    result = _init_and_all_reduce(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    Path(sys.argv[1], f"rank{result['rank']}.json").write_text(json.dumps(result))
    parallel.shutdown()
