"""`python -m realtime.cli` = `cemd`."""

import sys

from realtime.cli.main import main

sys.exit(main())
