import sys

from leukotree.cli import main

sys.exit(main())
