"""``python -m kvm_exporter``."""

import sys

from .cli import main

sys.exit(main())
