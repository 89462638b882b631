"""Entry point of the labeling job: ``python jobs/label.py ARGS`` or, on a cluster,

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/label.py ARGS

Same flags as ``diffcut label`` (``python jobs/label.py --help``). Without a
cluster address (``--address`` or ``RAY_ADDRESS``, which ``ray job submit``
sets) it starts an embedded Ray on 127.0.0.1.
"""

import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the job runs in a copy of the
# repository: import the package from that copy, the code that was submitted.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffcut.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
