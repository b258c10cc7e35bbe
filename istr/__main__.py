import sys

from istr.cli import main

sys.exit(main())
