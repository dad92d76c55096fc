"""Old name of :mod:`lexp.report.tables`: ``python -m lexp.tables`` and ``from lexp.tables import …`` still work."""

import sys

from lexp.report import tables as _tables

if __name__ == "__main__":
    raise SystemExit(_tables.main())
sys.modules[__name__] = _tables  # the same module object: private names and monkeypatching included
