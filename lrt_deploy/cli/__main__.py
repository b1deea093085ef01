"""``python -m lrt_deploy.cli``: lrt-export."""

import sys

from lrt_deploy.cli.export import main

sys.exit(main())
