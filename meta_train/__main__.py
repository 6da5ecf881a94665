"""``python -m meta_train ARGS`` is ``learnedopt meta-train ARGS``."""

import sys

from learnedopt.cli import main

raise SystemExit(main(["meta-train", *sys.argv[1:]]))
