"""Dataset-level classes for a labeled dataset: ``python jobs/discover.py ARGS`` or, on a cluster,

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/discover.py ARGS

Clusters the segment descriptors of ``diffcut label``'s output into K classes
(spherical k-means fitted on a sample, then every segment assigned in a second
Ray Data pass) and writes a class id per segment and a semantic label map per
image; see :mod:`diffcut.tools.discover` and ``python jobs/discover.py --help``.
Without a cluster address (``--address`` or ``RAY_ADDRESS``) it starts an
embedded Ray on 127.0.0.1.
"""

import argparse
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the job runs in a copy of the
# repository: import the package from that copy, the code that was submitted.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffcut.commands import discover
from diffcut.tools.discover import __doc__ as DISCOVER_DOC


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobs/discover.py",
        description=DISCOVER_DOC.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    discover.add_arguments(parser)
    return discover.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
