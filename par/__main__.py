import sys

from par.cli import main

sys.exit(main())
