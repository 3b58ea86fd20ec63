"""``python -m actcache.cli``: the same as the ``actcache`` command."""

import sys

from actcache.cli.app import main

sys.exit(main())
