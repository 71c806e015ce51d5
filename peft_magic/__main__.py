"""`python -m peft_magic train CONFIG.yaml` (also what `accelerate launch -m peft_magic` runs)."""

import sys

from .cli import main

sys.exit(main())
