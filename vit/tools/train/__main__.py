"""``python -m vit.tools.train`` and ``torchrun ... -m vit.tools.train``."""

import sys

from . import main

sys.exit(main())
