"""``python -m qmp_sdei`` is the ``qmp-sdei`` command."""

import sys

from qmp_sdei.cli import main

sys.exit(main())
