"""``python -m ldm ...`` is the ``ldm`` command (also under ``accelerate launch -m ldm``)."""

import sys

from ldm.cli import main

sys.exit(main())
