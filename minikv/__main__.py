import sys

from minikv.tools.cli import main

sys.exit(main())
