"""``python -m tools.cpu_matrix``: see ``tools.cpu_matrix.run``."""

import sys

from tools.cpu_matrix.run import main

sys.exit(main())
