import sys

from enserve.cli import main

sys.exit(main())
