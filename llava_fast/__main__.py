"""``python -m llava_fast ...`` is the ``llava-fast`` command (also ``torchrun -m llava_fast train ...``)."""
import sys

from llava_fast.cli import main

sys.exit(main())
