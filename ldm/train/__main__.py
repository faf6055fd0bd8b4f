"""``python -m ldm.train ...``: what ``torchrun`` and ``accelerate launch -m ldm.train`` start."""

import sys

from ldm.train.loop import train_main

sys.exit(train_main())
