"""``python -m lexp.report <run or sweep dirs> --out report.html`` (see :mod:`lexp.report.html`)."""

from lexp.report.html import main

raise SystemExit(main())
