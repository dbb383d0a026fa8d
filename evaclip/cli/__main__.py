"""``python -m evaclip.cli`` (what torchrun and the tests start)."""
import sys

from evaclip.cli import main

sys.exit(main())
