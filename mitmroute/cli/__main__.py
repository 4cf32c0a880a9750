import sys

from mitmroute.cli import main

sys.exit(main())
