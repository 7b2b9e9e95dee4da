import sys

from par.app.cli import main

sys.exit(main())
