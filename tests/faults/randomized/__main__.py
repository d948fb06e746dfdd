"""``python -m tests.faults.randomized --backend redis --workload counter --seed 7 ...``"""

import sys

from .runner import main

sys.exit(main(sys.argv[1:]))
