"""`python -m opslib.cli`: the console script, as the fleet runs it for each target."""

import sys

from opslib.cli.app import main

sys.exit(main())
