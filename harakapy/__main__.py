import sys

from harakapy.cli import main

sys.exit(main())
