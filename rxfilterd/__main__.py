import sys

from rxfilterd.cli import main

sys.exit(main())
