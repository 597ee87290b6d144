"""Export each checkpoint WORKDIR/ck_* to WORKDIR/rt_* (one process)."""

import sys
from pathlib import Path

from minitron_nemo.checkpoint.export import export_hf

if __name__ == "__main__":
    work = Path(sys.argv[1])
    for ck in sorted(work.glob("ck_*")):
        export_hf(ck, work / ("rt_" + ck.name[3:]))
