"""Prepare a dataset: `python jobs/prep.py --config configs/prep/X.yaml [key=value ...]`.

Runs unchanged on a laptop (starts a local Ray) and as `ray job submit -- python jobs/prep.py ...`
(joins the cluster the job runs on).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, for a bare checkout

from data_prep.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
