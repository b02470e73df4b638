"""`python -m tokenreduce.eval.synthetic OUT ...`"""

import sys

from .cli import main

sys.exit(main())
