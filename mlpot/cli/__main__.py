import sys

from mlpot.cli.main import main

sys.exit(main())
