import sys

from packmule.cli import main

sys.exit(main())
