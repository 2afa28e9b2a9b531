import sys

from orcinus.cli import main

sys.exit(main())
