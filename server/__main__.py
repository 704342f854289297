"""``python -m server`` == ``lethe serve``."""

import sys

from server.main import main

sys.exit(main())
