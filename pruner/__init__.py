"""Pruner Studio: structural pruning of large language models."""

import os

# Idle OpenMP threads sleep instead of spinning. On a machine with more runnable threads than
# cores (a shared 2-core box, the studio's page thread beside a search) spinning threads at each
# barrier wait for descheduled peers: a CPU forward ran 4x slower with 2 threads than with 1
# there. Read once, when torch's OpenMP starts; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
