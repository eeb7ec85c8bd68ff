"""``python -m launcher.agent``: what every transport starts on a host."""

import sys

from . import main

sys.exit(main())
