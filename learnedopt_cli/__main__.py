"""``python -m learnedopt_cli ARGS`` is ``learnedopt ARGS`` (what ``torchrun -m`` needs: a module, not a script)."""

from . import main

raise SystemExit(main())
