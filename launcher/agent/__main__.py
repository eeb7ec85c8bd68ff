"""``python -m launcher.agent``: what every transport starts on a host; with ``--join``, what dials in to the head."""

import sys

if len(sys.argv) > 1:
    from .join import main as join_main

    sys.exit(join_main(sys.argv[1:]))

from . import main

sys.exit(main())
