import sys

from framegraph.export.cli import main

sys.exit(main())
