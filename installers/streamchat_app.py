"""Entry point of the frozen app: the same command line as the `streamchat` console script."""

import sys

from streamchat.cli import main

sys.exit(main())
