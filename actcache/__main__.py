"""``python -m actcache``: the same as the ``actcache`` command (``python -X importtime -m actcache ls .``)."""

import sys

from actcache.cli.app import main

sys.exit(main())
